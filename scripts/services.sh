#!/usr/bin/env bash
# The loopback services the test suite talks to (SPEC §9): Mosquitto (with mosquitto_pub/sub),
# RabbitMQ and NATS with JetStream.
#
#   scripts/services.sh check    report what is missing; exit 1 if anything is
#   scripts/services.sh ensure   install (Debian, as root) and start what is missing, then wait
#                                until each answers; exit 1 if one still does not
set -euo pipefail

MODE=${1:-check}
WAIT_SECONDS=${SERVICES_WAIT_SECONDS:-180}

port_open() {  # host port
    (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null
}

have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ]; }

missing_packages() {
    local pkgs=()
    have mosquitto || pkgs+=(mosquitto)
    { have mosquitto_pub && have mosquitto_sub; } || pkgs+=(mosquitto-clients)
    have rabbitmq-server || pkgs+=(rabbitmq-server)
    have nats-server || pkgs+=(nats-server)
    have systemd-analyze || pkgs+=(systemd)  # the unit files are checked with systemd-analyze verify
    echo "${pkgs[@]:-}"
}

start_service() {  # name
    case "$1" in
        mosquitto) mosquitto -d -c /etc/mosquitto/mosquitto.conf ;;
        rabbitmq) rabbitmq-server -detached ;;
        nats)
            mkdir -p /var/lib/nats-server
            start-stop-daemon --start --oknodo --background --exec /usr/sbin/nats-server -- \
                -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server -l /var/log/nats-server.log
            ;;
    esac
}

SERVICES=("mosquitto 1883" "rabbitmq 5672" "nats 4222")

if [ "$MODE" = ensure ]; then
    pkgs=$(missing_packages)
    if [ -n "$pkgs" ]; then
        echo "services: installing $pkgs"
        if [ "$(id -u)" -ne 0 ]; then
            echo "services: installing packages needs root (apt-get install -y $pkgs)" >&2
            exit 1
        fi
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -q
        # shellcheck disable=SC2086
        apt-get install -y -q $pkgs
    fi
    for entry in "${SERVICES[@]}"; do
        read -r name port <<<"$entry"
        if ! port_open 127.0.0.1 "$port"; then
            echo "services: starting $name"
            start_service "$name" || echo "services: starting $name failed" >&2
        fi
    done
    deadline=$((SECONDS + WAIT_SECONDS))
    for entry in "${SERVICES[@]}"; do
        read -r name port <<<"$entry"
        until port_open 127.0.0.1 "$port"; do
            if [ "$SECONDS" -ge "$deadline" ]; then
                echo "services: $name does not answer on 127.0.0.1:$port after ${WAIT_SECONDS}s" >&2
                exit 1
            fi
            sleep 1
        done
    done
    if have rabbitmqctl; then
        timeout "$WAIT_SECONDS" rabbitmqctl -q await_startup >/dev/null 2>&1 || {
            echo "services: rabbitmq is listening but did not finish booting" >&2
            exit 1
        }
    fi
fi

problems=()
pkgs=$(missing_packages)
[ -z "$pkgs" ] || problems+=("not installed: $pkgs")
for entry in "${SERVICES[@]}"; do
    read -r name port <<<"$entry"
    port_open 127.0.0.1 "$port" || problems+=("$name is not answering on 127.0.0.1:$port")
done
if [ ${#problems[@]} -gt 0 ]; then
    for problem in "${problems[@]}"; do echo "services: $problem" >&2; done
    echo "services: run 'sudo scripts/services.sh ensure' (Debian/Ubuntu) or start them yourself" >&2
    exit 1
fi
echo "services: mosquitto, rabbitmq and nats are answering on 127.0.0.1"
