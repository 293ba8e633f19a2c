"""Publishes tasks with real Celery, as an application would.

    python publish.py --queue Q [--count N] [--priority P | --priorities 0-9] [--countdown S]
                      [--seconds S] [--marker KEY] [--routing-key K] [--exchange E]

With CKS_TASK_QUEUES, every configured queue is declared (and bound) first.

Prints the number of tasks published. The app is configured from the environment (cks_app). On
RabbitMQ every publish is confirmed by the broker before the next (`confirm_publish`).
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from cks_app import app, sleep  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--queue", required=True)
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--priority", type=int)
    p.add_argument(
        "--priorities",
        help="lo-hi: publish --count tasks for each priority in the range",
    )
    p.add_argument("--countdown", type=float)
    p.add_argument("--seconds", type=float, default=0.0, help="how long each task sleeps")
    p.add_argument("--marker")
    p.add_argument("--routing-key", help="routing key (default: the queue's own)")
    p.add_argument(
        "--exchange",
        help="exchange (with --routing-key; without both Celery sends a direct queue's tasks "
        "through the default exchange)",
    )
    a = p.parse_args()

    # On RabbitMQ every publish waits for the broker's confirm, so that when this script returns
    # the messages are in their queues (what the tests then assert), however loaded the node is.
    if os.environ["CKS_BROKER"].split("://", 1)[0] in ("amqp", "amqps", "pyamqp"):
        app.conf.broker_transport_options = {
            **app.conf.broker_transport_options,
            "confirm_publish": True,
        }

    if os.environ.get("CKS_TASK_QUEUES"):
        with app.connection_for_write() as conn:
            for q in app.conf.task_queues:
                q(conn.default_channel).declare()

    if a.priorities:
        lo, hi = (int(x) for x in a.priorities.split("-"))
        priorities = [pri for pri in range(lo, hi + 1) for _ in range(a.count)]
    else:
        priorities = [a.priority] * a.count

    published = 0
    with app.producer_or_acquire() as producer:
        for pri in priorities:
            options = {"queue": a.queue, "producer": producer}
            if pri is not None:
                options["priority"] = pri
            if a.exchange is not None:
                options["exchange"] = a.exchange
            if a.routing_key is not None:
                options["routing_key"] = a.routing_key
            if a.countdown is not None:
                options["countdown"] = a.countdown
            sleep.apply_async(args=(a.seconds, a.marker), **options)
            published += 1
    # A clean AMQP close (connection.close), not a socket dropped at exit.
    app.close()
    print(published)


if __name__ == "__main__":
    main()
