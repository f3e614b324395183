#!/bin/sh
# Start mosquitto with a password file and an ACL generated from the environment (nothing secret
# is committed). Devices register themselves by creating a file named after their device id in
# /registrations (see deploy/bin/agent-entrypoint); this script adds them as users and reloads
# mosquitto (SIGHUP), so `--scale device-agent=50` needs no broker change.
#
#   MQTT_DEVICE_PASSWORD   password of every device user (dev default below)
#   MQTT_EDGE_USERS        edge ids, space-separated (each gets MQTT_EDGE_PASSWORD)
#   MQTT_EDGE_PASSWORD, MQTT_CLOUD_PASSWORD, MQTT_OPS_PASSWORD, MQTT_HEALTH_PASSWORD
#   MQTT_TLS=1             also listen on 8883 with /mosquitto/tls/{ca.crt,server.crt,server.key}
set -eu

DEV_DEFAULT=edgefleet-dev-only   # DEVELOPMENT DEFAULT: set the MQTT_*_PASSWORD variables for real use
AUTH=/mosquitto/auth
REG=/registrations
CONF=/mosquitto/auth/mosquitto.conf
mkdir -p "$AUTH" "$REG"
chmod 1733 "$REG"   # devices may add their own entry, not list or remove others'

users_plaintext() {
  echo "cloud:${MQTT_CLOUD_PASSWORD:-$DEV_DEFAULT}"
  echo "ops:${MQTT_OPS_PASSWORD:-$DEV_DEFAULT}"
  echo "health:${MQTT_HEALTH_PASSWORD:-$DEV_DEFAULT}"
  for edge in ${MQTT_EDGE_USERS:-edge-1 edge-2}; do
    echo "$edge:${MQTT_EDGE_PASSWORD:-$DEV_DEFAULT}"
  done
  for entry in "$REG"/*; do
    [ -f "$entry" ] || continue
    device=${entry##*/}
    case $device in
      *[!A-Za-z0-9_.:-]*) echo "start.sh: ignoring registration with a bad name: $device" >&2 ;;
      *) echo "$device:${MQTT_DEVICE_PASSWORD:-$DEV_DEFAULT}" ;;
    esac
  done
}

generate() {
  users_plaintext >"$AUTH/passwd.new"
  mosquitto_passwd -U "$AUTH/passwd.new"
  {
    cat /mosquitto/config/acl.template
    for edge in ${MQTT_EDGE_USERS:-edge-1 edge-2}; do
      # An edge splits the devices' telemetry with the other edges (shared subscription), sends
      # them commands and reads their acks and status.
      printf '\nuser %s\n' "$edge"
      printf 'topic read ef/v1/dev/+/telemetry\ntopic read $share/+/ef/v1/dev/+/telemetry\n'
      printf 'topic read ef/v1/dev/+/ack\ntopic read ef/v1/dev/+/status\ntopic read ef/v1/dev/+/health\n'
      printf 'topic write ef/v1/dev/+/cmd\n'
    done
  } >"$AUTH/acl.new"
  chown mosquitto:mosquitto "$AUTH/passwd.new" "$AUTH/acl.new" 2>/dev/null || true
  chmod 0600 "$AUTH/passwd.new" "$AUTH/acl.new"
  mv "$AUTH/passwd.new" "$AUTH/passwd"
  mv "$AUTH/acl.new" "$AUTH/acl"
}

registrations() { ls "$REG" 2>/dev/null | md5sum; }

cp /mosquitto/config/mosquitto.conf "$CONF"
if [ "${MQTT_TLS:-0}" = 1 ]; then
  printf '\nlistener 8883 0.0.0.0\ncafile /mosquitto/tls/ca.crt\ncertfile /mosquitto/tls/server.crt\nkeyfile /mosquitto/tls/server.key\n' >>"$CONF"
fi
generate
seen=$(registrations)
mosquitto -c "$CONF" &
pid=$!
trap 'kill -TERM "$pid" 2>/dev/null' TERM INT
while kill -0 "$pid" 2>/dev/null; do
  sleep 1 &
  wait $! || true
  now=$(registrations)
  if [ "$now" != "$seen" ]; then
    seen=$now
    generate
    kill -HUP "$pid" 2>/dev/null || true
    echo "start.sh: $(ls "$REG" | wc -l) device users, reloaded"
  fi
done
wait "$pid"
