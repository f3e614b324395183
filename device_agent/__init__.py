"""The edgefleet device agent: sensor -> windows -> durable outbox -> MQTT, plus commands and health."""
