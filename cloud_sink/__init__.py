"""The cloud sink: terminate mTLS MQTT, check certificate-bound JWTs, feed the core queue."""
