"""Sensor plugins. Importing this package registers the built-in sensors."""

from device_agent.sensors import command, replay, simulated
from device_agent.sensors.base import SENSORS, Sensor, SensorOptions, create_sensor, register_sensor

__all__ = [
    "SENSORS",
    "Sensor",
    "SensorOptions",
    "command",
    "create_sensor",
    "register_sensor",
    "replay",
    "simulated",
]
