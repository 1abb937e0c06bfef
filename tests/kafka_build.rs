//! The librdkafka conveyor links must speak what managed Kafka services and
//! today's producers use: TLS, SASL PLAIN/SCRAM, and every compression codec.
//! A build that lost a Cargo feature fails here, not at a customer's broker.

use rdkafka::ClientConfig;

#[test]
fn librdkafka_has_tls_sasl_and_every_codec() {
    let native = ClientConfig::new()
        .create_native_config()
        .expect("librdkafka config");
    let features = native.get("builtin.features").expect("builtin.features");
    let have: Vec<&str> = features.split(',').collect();
    for want in [
        "ssl",
        "sasl_plain",
        "sasl_scram",
        "gzip",
        "snappy",
        "lz4",
        "zstd",
    ] {
        assert!(
            have.contains(&want),
            "librdkafka lacks {want}: builtin.features = {features}"
        );
    }
}
