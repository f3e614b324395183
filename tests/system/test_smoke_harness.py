from shared.mqtt import MqttLink
from shared.settings import MqttSettings


def test_broker_fixture_roundtrip(mosquitto):
    link = MqttLink(MqttSettings(url=mosquitto.url), client_id="harness")
    link.subscribe("x/#")
    link.connect()
    link.publish("x/y", b"hello")
    assert link.inbox.get(timeout=5).payload == b"hello"
    link.stop()
