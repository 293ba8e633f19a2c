"""The Celery app used by the integration tests (real Celery, real brokers).

Configured from the environment so one file serves every scenario:

- CKS_BROKER: the broker URL (required).
- CKS_GLOBAL_KEYPREFIX, CKS_PRIORITY_STEPS ("0,5"), CKS_SEP: kombu Redis transport options.
- CKS_ACKS_LATE ("1"): task_acks_late.
- CKS_PREFETCH: worker_prefetch_multiplier (default 1).
- CKS_MARKER_REDIS: a Redis URL where `cks.sleep` counts started tasks (key given per call).
- CKS_QUEUE_ARGS: JSON {queue: {argument: value}} declaring queues with arguments
  (RabbitMQ `x-max-priority`, `x-queue-type: quorum`).
- CKS_CONFIRM_PUBLISH ("1"): the `confirm_publish` transport option (RabbitMQ).
- CKS_QUEUE_NAME_PREFIX: the `queue_name_prefix` transport option (SQS). An sqs:// broker also
  gets `region: us-east-1` and `is_secure: False` (the local moto server speaks plain HTTP).
- CKS_PREDEFINED_QUEUES: JSON, kombu's `predefined_queues` transport option (SQS): queue name
  -> {"url", optional "access_key_id", "secret_access_key"}.
- CKS_TASK_QUEUES: JSON [{"name", "exchange", "type", "routing_key"}] for custom routing:
  `task_queues` bound to named direct/topic/fanout exchanges (publish.py declares them all
  before publishing, so every binding exists before the first message is routed).
"""

import json
import os
import time

from celery import Celery
from kombu import Exchange, Queue

app = Celery("cks", broker=os.environ["CKS_BROKER"])

transport_options = {}
if os.environ.get("CKS_GLOBAL_KEYPREFIX"):
    transport_options["global_keyprefix"] = os.environ["CKS_GLOBAL_KEYPREFIX"]
if os.environ.get("CKS_PRIORITY_STEPS"):
    transport_options["priority_steps"] = [
        int(s) for s in os.environ["CKS_PRIORITY_STEPS"].split(",")
    ]
if os.environ.get("CKS_SEP"):
    transport_options["sep"] = os.environ["CKS_SEP"]
if os.environ.get("CKS_CONFIRM_PUBLISH") == "1":
    transport_options["confirm_publish"] = True
if os.environ["CKS_BROKER"].startswith("sqs://"):
    transport_options["region"] = "us-east-1"
    transport_options["is_secure"] = False
    transport_options["queue_name_prefix"] = os.environ.get("CKS_QUEUE_NAME_PREFIX", "")
if os.environ.get("CKS_PREDEFINED_QUEUES"):
    transport_options["predefined_queues"] = json.loads(os.environ["CKS_PREDEFINED_QUEUES"])
if os.environ.get("CKS_MASTER_NAME"):
    transport_options["master_name"] = os.environ["CKS_MASTER_NAME"]

app.conf.update(
    broker_transport_options=transport_options,
    task_acks_late=os.environ.get("CKS_ACKS_LATE") == "1",
    worker_prefetch_multiplier=int(os.environ.get("CKS_PREFETCH", "1")),
    task_create_missing_queues=True,
    # Tests publish and inspect; results are never read.
    task_ignore_result=True,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    worker_send_task_events=False,
    # Celery warns about this being unset on startup; it is the test's choice.
    worker_cancel_long_running_tasks_on_connection_loss=True,
)

if os.environ.get("CKS_QUEUE_ARGS"):
    app.conf.task_queues = [
        Queue(name, Exchange(name), routing_key=name, queue_arguments=args, durable=True)
        for name, args in json.loads(os.environ["CKS_QUEUE_ARGS"]).items()
    ]

if os.environ.get("CKS_TASK_QUEUES"):
    app.conf.task_queues = [
        Queue(
            q["name"],
            Exchange(q["exchange"], type=q.get("type", "direct")),
            routing_key=q.get("routing_key", q["name"]),
        )
        for q in json.loads(os.environ["CKS_TASK_QUEUES"])
    ]


@app.task(name="cks.sleep")
def sleep(seconds, marker=None):
    """Sleeps; first counts itself as started under `marker` so tests can wait for it."""
    if marker:
        import redis

        redis.Redis.from_url(os.environ["CKS_MARKER_REDIS"]).incr(marker)
    time.sleep(seconds)


@app.task(name="cks.noop")
def noop():
    return None
