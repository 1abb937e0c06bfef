//! The read side of ingest: `GET /orders/{order_id}` (one stored outcome)
//! and `GET /orders` (streamed from the store with a server-side cursor:
//! flat memory, first bytes before the query ends, the query cancelled
//! when the client leaves).

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use futures::StreamExt as _;
use serde::Deserialize;

use super::{json_error, retry_after, Shared};
use crate::store::read::Filter;
use crate::tools::export::Format;

pub(super) async fn get_order(State(s): State<Shared>, Path(order_id): Path<String>) -> Response {
    let r = match s.store.get_order(&order_id).await {
        Ok(Some(row)) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            row.to_json(),
        )
            .into_response(),
        Ok(None) => json_error(
            StatusCode::NOT_FOUND,
            format!("no stored order {order_id:?}"),
        ),
        Err(e) => retry_after(
            json_error(StatusCode::SERVICE_UNAVAILABLE, format!("the store: {e}")),
            1,
        ),
    };
    s.metrics.answered("/orders/{order_id}", r.status());
    r
}

#[derive(Debug, Deserialize)]
pub(super) struct ListParams {
    status: Option<String>,
    since: Option<String>,
    until: Option<String>,
    format: Option<String>,
}

fn parse_time(key: &str, v: &str) -> Result<chrono::DateTime<chrono::Utc>, String> {
    chrono::DateTime::parse_from_rfc3339(v)
        .map(|t| t.with_timezone(&chrono::Utc))
        .map_err(|e| format!("{key}: {e} (RFC 3339, e.g. 2026-11-22T10:00:00Z)"))
}

fn parse_list(p: &ListParams) -> Result<(Filter, Format), String> {
    let filter = Filter {
        status: p.status.as_deref().map(str::parse).transpose()?,
        since: p
            .since
            .as_deref()
            .map(|v| parse_time("since", v))
            .transpose()?,
        until: p
            .until
            .as_deref()
            .map(|v| parse_time("until", v))
            .transpose()?,
    };
    let format = match p.format.as_deref() {
        None | Some("ndjson") => Format::Ndjson,
        Some("csv") => Format::Csv,
        Some(other) => return Err(format!("format: {other:?} is not ndjson or csv")),
    };
    Ok((filter, format))
}

pub(super) async fn list_orders(State(s): State<Shared>, Query(p): Query<ListParams>) -> Response {
    const ROUTE: &str = "/orders";
    let (filter, format) = match parse_list(&p) {
        Ok(v) => v,
        Err(e) => {
            s.metrics.answered(ROUTE, StatusCode::BAD_REQUEST);
            return json_error(StatusCode::BAD_REQUEST, e);
        }
    };
    let mut rows = s.store.stream_orders(filter).ready_chunks(256);
    // The first rows (or the error) before the headers: a store that is
    // down is a 503, not a 200 cut short.
    let first = rows.next().await;
    if let Some(chunk) = &first {
        if let Some(Err(e)) = chunk.iter().find(|r| r.is_err()) {
            s.metrics.answered(ROUTE, StatusCode::SERVICE_UNAVAILABLE);
            return retry_after(
                json_error(StatusCode::SERVICE_UNAVAILABLE, format!("the store: {e}")),
                1,
            );
        }
    }
    s.metrics.answered(ROUTE, StatusCode::OK);
    let encode = move |chunk: Vec<Result<crate::store::read::StoredOrder, sqlx::Error>>| {
        let mut buf = Vec::with_capacity(chunk.len() * 256);
        for row in chunk {
            match row {
                Ok(r) => format.encode(&r, &mut buf),
                // Mid-stream, an error can only cut the body short; the
                // client sees an incomplete chunked response, not a clean end.
                Err(e) => return Err(std::io::Error::other(e.to_string())),
            }
        }
        Ok(Bytes::from(buf))
    };
    let head =
        futures::stream::iter([Ok::<_, std::io::Error>(Bytes::from_static(format.header()))]);
    let body = head
        .chain(futures::stream::iter(first).map(encode))
        .chain(rows.map(encode));
    (
        [(header::CONTENT_TYPE, format.content_type())],
        Body::from_stream(body),
    )
        .into_response()
}
