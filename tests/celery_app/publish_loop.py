"""A long-lived Celery publisher for the KEDA end-to-end suite (e2e/keda).

Reads one JSON command per line on stdin and answers one JSON line on stdout, so a test can
publish at a moment it chooses without paying Python's and Celery's start-up each time:

    {"op": "publish", "queue": "celery", "count": 1, "seconds": 0, "marker": null}
        -> {"ok": true, "published": 1}
    {"op": "purge", "queues": ["celery", "priority"]}
        -> {"ok": true, "purged": N}   (every priority list of each queue, as kombu purges; on
                                        SQS every visible message received and deleted)
    {"op": "counter", "key": "marker"}
        -> {"ok": true, "value": N}   (Redis brokers: a `cks.sleep` start counter, 0 if unset)

The app is configured from the environment (cks_app: CKS_BROKER and friends). A failed command
answers {"ok": false, "error": "..."} and the loop goes on.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from cks_app import app, sleep  # noqa: E402


def publish(cmd):
    published = 0
    with app.producer_or_acquire() as producer:
        for _ in range(int(cmd.get("count", 1))):
            options = {"queue": cmd["queue"], "producer": producer}
            if cmd.get("priority") is not None:
                options["priority"] = cmd["priority"]
            sleep.apply_async(args=(float(cmd.get("seconds", 0)), cmd.get("marker")), **options)
            published += 1
    return {"ok": True, "published": published}


def purge(cmd):
    purged = 0
    with app.connection_for_write() as conn:
        channel = conn.default_channel
        if conn.transport_cls == "sqs":
            # SQS allows one PurgeQueue per queue a minute: receive and delete instead, as a
            # worker would (this also creates a queue that does not exist yet, as kombu does).
            for queue in cmd["queues"]:
                while (message := channel.basic_get(queue, no_ack=False)) is not None:
                    message.ack()
                    purged += 1
            return {"ok": True, "purged": purged}
        for queue in cmd["queues"]:
            try:
                purged += channel.queue_purge(queue) or 0
            except Exception as e:  # a queue that does not exist has nothing to purge
                if "NOT_FOUND" not in str(e):
                    raise
    return {"ok": True, "purged": purged}


def counter(cmd):
    import redis

    value = redis.Redis.from_url(os.environ["CKS_BROKER"]).get(cmd["key"])
    return {"ok": True, "value": int(value or 0)}


def main():
    ops = {"publish": publish, "purge": purge, "counter": counter}
    print(json.dumps({"ok": True, "ready": True}), flush=True)
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        try:
            cmd = json.loads(line)
            answer = ops[cmd["op"]](cmd)
        except Exception as e:
            answer = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
