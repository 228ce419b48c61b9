#!/usr/bin/python3
"""A small MQTT device driven by the end-to-end tests, written with Eclipse Paho (python3-paho-mqtt):
a client we did not write, over mutual TLS with certificates issued through the REST API.

Modes:
  hold       connect (with an optional will), print "connected", keep pinging until killed
  silent     connect (with an optional will), print "connected", then never send another byte
  clean      connect (with an optional will), print "connected", DISCONNECT cleanly, exit 0
  subscribe  connect, subscribe, print "<topic> <retain> <payload>" per message; exit after --count messages
             (exit 3 when --timeout passes first, exit 4 when the server drops the connection)
  publish    connect, publish one message, wait until it is acknowledged, disconnect
  persist    connect with --clean-session (MQTT 5: Clean Start, --session-expiry; --disconnect-expiry), print
             "session_present=<0|1>" (MQTT 5: and " session_expiry=<CONNACK's or ->"), subscribe to --topic only when
             --subscribe is given (to --reply instead when given), publish --payload to --topic at QoS 1, print the
             first message that comes back (or "nothing")
  request    connect, subscribe to --reply (a filter), publish --payload to --topic at --qos, print the first
             --count messages that arrive on --reply ("<topic> <payload>"), exit 3 on --timeout
  loopback   connect, subscribe to --topic at --qos, publish --count messages to it (at --pub-qos, default
             --qos), exit 0 when all came back; prints the QoS levels they came at
  steps      connect, then do each --step in order: "sub FILTER [nl] [rap] [rh=N]" (QoS 1; with --v5 the options
             No Local, Retain As Published, Retain Handling) and "unsub FILTER", each waiting for the broker's
             ack; "pub TOPIC PAYLOAD" and "pubr TOPIC PAYLOAD" (QoS 1; retained); "wait N" (until N messages have
             arrived in all, exit 3 on --timeout); "sleep SECONDS"; prints every message as subscribe does
Exit code 2 with "refused <rc>" when the server refuses the connection.
"""
import argparse
import ssl
import sys
import threading
import time

import paho.mqtt.client as mqtt


def main():
    p = argparse.ArgumentParser()
    p.add_argument("mode")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--ca", required=True)
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--id", required=True)
    p.add_argument("--v5", action="store_true")
    p.add_argument("--keepalive", type=int, default=30)
    p.add_argument("--will-topic")
    p.add_argument("--will-payload", default="gone")
    p.add_argument("--will-retain", action="store_true")
    p.add_argument("--topic")
    p.add_argument("--payload", default="")
    p.add_argument("--qos", type=int, default=0)
    p.add_argument("--pub-qos", type=int, help="loopback: publish at this QoS (default: --qos)")
    p.add_argument("--retain", action="store_true")
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--timeout", type=float, default=10)
    p.add_argument("--clean-session", type=int, default=1)
    p.add_argument("--session-expiry", type=int, help="MQTT 5: Session Expiry Interval in CONNECT (seconds)")
    p.add_argument("--disconnect-expiry", type=int, help="MQTT 5 persist: Session Expiry Interval in DISCONNECT")
    p.add_argument("--subscribe", action="store_true")
    p.add_argument("--reply")
    p.add_argument("--step", action="append", default=[])
    a = p.parse_args()

    protocol = mqtt.MQTTv5 if a.v5 else mqtt.MQTTv311
    kwargs = {} if a.v5 else {"clean_session": bool(a.clean_session)}
    c = mqtt.Client(client_id=a.id, protocol=protocol, **kwargs)
    c.tls_set(ca_certs=a.ca, certfile=a.cert, keyfile=a.key, tls_version=ssl.PROTOCOL_TLS_CLIENT)
    if a.will_topic:
        c.will_set(a.will_topic, a.will_payload, qos=1, retain=a.will_retain)

    connected = threading.Event()
    result = {"rc": None}
    received = []
    dropped = threading.Event()

    def on_connect(client, userdata, flags, rc, properties=None):
        result["rc"] = int(rc) if not hasattr(rc, "value") else rc.value
        result["session_present"] = int(flags.get("session present", 0))
        result["session_expiry"] = getattr(properties, "SessionExpiryInterval", None)
        connected.set()

    def on_message(client, userdata, msg):
        received.append(msg)
        print(f"{msg.topic} {int(msg.retain)} {msg.payload.decode(errors='replace')}", flush=True)

    def on_disconnect(client, userdata, rc, properties=None):
        dropped.set()

    c.on_connect = on_connect
    c.on_message = on_message
    c.on_disconnect = on_disconnect

    if a.v5:
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        props = None
        if a.session_expiry is not None:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = a.session_expiry
        c.connect("localhost", a.port, keepalive=a.keepalive, clean_start=bool(a.clean_session), properties=props)
    else:
        c.connect("localhost", a.port, keepalive=a.keepalive)
    if a.mode == "silent":
        # CONNECT is on the wire; read nothing and send nothing more, so no PINGREQ ever goes out.
        print("connected", flush=True)
        time.sleep(3600)
        return 0

    c.loop_start()
    if not connected.wait(a.timeout):
        print("no connack", flush=True)
        return 2
    if result["rc"] != 0:
        print(f"refused {result['rc']}", flush=True)
        return 2
    print("connected", flush=True)

    if a.mode == "hold":
        while True:
            time.sleep(1)
    if a.mode == "clean":
        c.disconnect()
        c.loop_stop()
        return 0
    if a.mode == "publish":
        info = c.publish(a.topic, a.payload, qos=a.qos, retain=a.retain)
        info.wait_for_publish(a.timeout)
        ok = info.is_published()
        c.disconnect()
        c.loop_stop()
        return 0 if ok else 5
    if a.mode == "subscribe":
        c.subscribe(a.topic, qos=a.qos)
        deadline = time.time() + a.timeout
        while len(received) < a.count:
            if dropped.is_set():
                print("dropped", flush=True)
                return 4
            if time.time() > deadline:
                return 3
            time.sleep(0.02)
        c.disconnect()
        c.loop_stop()
        return 0
    if a.mode == "persist":
        line = f"session_present={result['session_present']}"
        if a.v5:
            # What the server said of the session's expiry in its CONNACK ("-": nothing, what was asked holds).
            expiry = result["session_expiry"]
            line += f" session_expiry={'-' if expiry is None else expiry}"
        print(line, flush=True)
        if a.subscribe:
            c.subscribe(a.reply or a.topic, qos=1)
            time.sleep(0.3)
        c.publish(a.topic, a.payload, qos=1)
        deadline = time.time() + a.timeout
        while not received and time.time() < deadline:
            time.sleep(0.02)
        print(received[0].payload.decode() if received else "nothing", flush=True)
        if received:
            # paho acknowledges a message after its callback: let the PUBACK out before the DISCONNECT, or the
            # broker keeps the message for the session's next connection.
            time.sleep(0.2)
        if a.v5 and a.disconnect_expiry is not None:
            from paho.mqtt.packettypes import PacketTypes
            from paho.mqtt.properties import Properties

            props = Properties(PacketTypes.DISCONNECT)
            props.SessionExpiryInterval = a.disconnect_expiry
            c.disconnect(properties=props)
        else:
            c.disconnect()
        c.loop_stop()
        return 0
    if a.mode == "request":
        c.subscribe(a.reply, qos=1)
        time.sleep(0.3)
        c.publish(a.topic, a.payload, qos=a.qos)
        deadline = time.time() + a.timeout
        while len(received) < a.count and time.time() < deadline:
            time.sleep(0.02)
        c.disconnect()
        c.loop_stop()
        return 0 if len(received) >= a.count else 3
    if a.mode == "loopback":
        done = threading.Event()
        c.subscribe(a.topic, qos=a.qos)
        time.sleep(0.3)
        pub_qos = a.qos if a.pub_qos is None else a.pub_qos
        for i in range(a.count):
            c.publish(a.topic, f"{a.payload}{i}", qos=pub_qos)
        deadline = time.time() + a.timeout
        while len(received) < a.count and time.time() < deadline and not dropped.is_set():
            time.sleep(0.02)
        got = sorted(m.payload.decode() for m in received)
        want = sorted(f"{a.payload}{i}" for i in range(a.count))
        c.disconnect()
        c.loop_stop()
        if got != want:
            print(f"mismatch: got {got}", flush=True)
            return 6
        qos_seen = {m.qos for m in received}
        print(f"ok qos={sorted(qos_seen)}", flush=True)
        return 0
    if a.mode == "steps":
        acked = threading.Event()
        c.on_subscribe = lambda *args: acked.set()
        c.on_unsubscribe = lambda *args: acked.set()
        for step in a.step:
            verb, _, rest = step.partition(" ")
            if verb in ("sub", "unsub"):
                acked.clear()
                topic, *flags = rest.split()
                if verb == "unsub":
                    c.unsubscribe(topic)
                elif a.v5:
                    from paho.mqtt.subscribeoptions import SubscribeOptions

                    rh = next((int(f[3:]) for f in flags if f.startswith("rh=")), 0)
                    options = SubscribeOptions(
                        qos=1, noLocal="nl" in flags, retainAsPublished="rap" in flags, retainHandling=rh
                    )
                    c.subscribe(topic, options=options)
                else:
                    c.subscribe(topic, qos=1)
                if not acked.wait(a.timeout):
                    print(f"no ack for {step}", flush=True)
                    return 3
            elif verb in ("pub", "pubr"):
                topic, _, payload = rest.partition(" ")
                c.publish(topic, payload, qos=1, retain=verb == "pubr").wait_for_publish(a.timeout)
            elif verb == "wait":
                deadline = time.time() + a.timeout
                while len(received) < int(rest):
                    if time.time() > deadline:
                        print(f"timeout at {step}", flush=True)
                        return 3
                    time.sleep(0.02)
            elif verb == "sleep":
                time.sleep(float(rest))
            else:
                print(f"unknown step {step}", file=sys.stderr)
                return 1
        c.disconnect()
        c.loop_stop()
        return 0
    print(f"unknown mode {a.mode}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
