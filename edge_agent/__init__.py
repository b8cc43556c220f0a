"""The edge agent: accept local device events, commit them to SQLite, forward over mTLS MQTT."""
