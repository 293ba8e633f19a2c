package e2e

import (
	"strings"
	"testing"
	"time"

	"github.com/celery-keda-scaler/e2e/keda/harness"
)

// TestMistakesAreShownAndFixed: what a user sees for three mistakes, and that fixing each scales.
//   - `queueLength: abc` (GetMetricSpec refuses): Ready=False, the scaler's message naming the key
//     in the operator's log, no replica change while a task waits; fixed -> 1 replica.
//   - a broker URL with an unknown scheme behind brokerUrlFromEnv: the same; fixed Secret -> 1.
//   - a queue missing on RabbitMQ (a reading fails): KEDAScalerFailed event with NOT_FOUND naming
//     the queue; the queue declared by Celery -> 1.
//   - a queue missing on SQS: the same, naming the Celery queue and the SQS queue it maps to;
//     the queue created by Celery -> 1.
func TestMistakesAreShownAndFixed(t *testing.T) {
	t.Parallel()
	broker := harness.LeaseRedisDB(t).URL
	pub := harness.NewPublisher(t, broker)
	pub.Purge(t, "celery", "priority")
	pub.Publish(t, "celery", 1, 0)
	t.Cleanup(func() { pub.Purge(t, "celery", "priority") })

	t.Run("queueLength", func(t *testing.T) {
		t.Parallel()
		ns := harness.Namespace(t, harness.NSName(t, ""))
		secret, deployment, so := harness.RedisWorkerExample(t, broker)
		harness.SetTrigger(t, so, "queueLength", "abc")
		harness.Apply(t, ns, secret, deployment, so)
		rw := harness.WatchReplicas(t, ns, deployment.GetName())
		harness.WaitNotReady(t, ns, so.GetName(), "no metric specs returned from scalers")
		line := harness.WaitLogLine(t, harness.Kube.OperatorLog, `"namespace": "`+ns+`"`, "code = InvalidArgument desc = metadata key `queueLength`", 30*time.Second)
		t.Logf("operator log: %.400s", line)
		harness.HoldReplicas(t, rw, 0, 10*time.Second)
		harness.SetTrigger(t, so, "queueLength", "10")
		harness.Apply(t, ns, so)
		if _, ok := rw.WaitFor(1, 60*time.Second); !ok {
			t.Fatalf("queueLength fixed: replicas %d, want 1\n%s", rw.Current().Replicas, harness.Describe(ns, harness.ScaledObjectGVR, so.GetName()))
		}
	})

	t.Run("brokerScheme", func(t *testing.T) {
		t.Parallel()
		ns := harness.Namespace(t, harness.NSName(t, ""))
		secret, deployment, so := harness.RedisWorkerExample(t, broker)
		harness.Set(t, secret, "mongodb://127.0.0.1:27017/0", "stringData", "url")
		harness.Apply(t, ns, secret, deployment, so)
		rw := harness.WatchReplicas(t, ns, deployment.GetName())
		harness.WaitNotReady(t, ns, so.GetName(), "no metric specs returned from scalers")
		line := harness.WaitLogLine(t, harness.Kube.OperatorLog, `"namespace": "`+ns+`"`, "code = InvalidArgument desc = metadata key `brokerUrlFromEnv`", 30*time.Second)
		t.Logf("operator log: %.400s", line)
		harness.HoldReplicas(t, rw, 0, 10*time.Second)
		harness.Set(t, secret, broker, "stringData", "url")
		harness.Apply(t, ns, secret)
		// KEDA v2.20 keeps the environment it resolved for the failed scaler through its retries
		// and through a change of annotations (measured: the old URL was still sent 70 s later);
		// a change of the ScaledObject's spec makes it build the scaler again (README,
		// Troubleshooting).
		harness.Set(t, so, int64(31), "spec", "pollingInterval")
		harness.Apply(t, ns, so)
		if _, ok := rw.WaitFor(1, 60*time.Second); !ok {
			t.Fatalf("Secret fixed: replicas %d, want 1\n%s", rw.Current().Replicas, harness.Describe(ns, harness.ScaledObjectGVR, so.GetName()))
		}
	})

	t.Run("missingRabbitQueue", func(t *testing.T) {
		t.Parallel()
		ns := harness.Namespace(t, harness.NSName(t, ""))
		amqp, mgmt := harness.RabbitVhost(t, ns)
		objs := harness.ReadExample(t, "deploy/examples/rabbitmq/worker.yaml")
		secret, deployment, so := harness.Find(t, objs, "Secret"), harness.Find(t, objs, "Deployment"), harness.Find(t, objs, "ScaledObject")
		harness.Set(t, secret, amqp, "stringData", "url")
		harness.SetImage(t, deployment)
		harness.SetTrigger(t, so, "scalerAddress", harness.Scaler.Addr)
		harness.SetTrigger(t, so, "managementUrl", mgmt)
		harness.Set(t, so, int64(5), "spec", "pollingInterval")
		rpub := harness.NewPublisher(t, amqp)
		rpub.Publish(t, "celery", 1, 0) // declares `celery`; `priority` does not exist yet
		harness.Apply(t, ns, secret, deployment, so)
		rw := harness.WatchReplicas(t, ns, deployment.GetName())
		ev := harness.WaitEvent(t, ns, "KEDAScalerFailed", "NotFound", 60*time.Second)
		t.Logf("event: %s", ev)
		if !strings.Contains(ev, "priority") {
			t.Fatalf("the KEDAScalerFailed event does not name the missing queue: %s", ev)
		}
		harness.HoldReplicas(t, rw, 0, 10*time.Second)
		rpub.Publish(t, "priority", 1, 0)
		if _, ok := rw.WaitFor(1, 60*time.Second); !ok {
			t.Fatalf("queue declared: replicas %d, want 1\n%s", rw.Current().Replicas, harness.Describe(ns, harness.ScaledObjectGVR, so.GetName()))
		}
		rpub.Purge(t, "celery", "priority")
	})

	t.Run("missingSQSQueue", func(t *testing.T) {
		t.Parallel()
		ns := harness.Namespace(t, harness.NSName(t, ""))
		b := harness.NewExampleBroker(t, "sqs", ns)
		secret, deployment, so := b.WorkerExample(t)
		harness.SetTrigger(t, so, "queues", "celery,orders.high")
		harness.Set(t, so, int64(5), "spec", "pollingInterval")
		spub := b.Publisher(t)
		spub.Publish(t, "celery", 1, 0) // creates `<prefix>celery`; `<prefix>orders-high` does not exist yet
		harness.Apply(t, ns, secret, deployment, so)
		rw := harness.WatchReplicas(t, ns, deployment.GetName())
		ev := harness.WaitEvent(t, ns, "KEDAScalerFailed", "NotFound", 60*time.Second)
		t.Logf("event: %s", ev)
		// Both names: the Celery queue the user wrote and the SQS queue kombu would use.
		if !strings.Contains(ev, "`orders.high`") || !strings.Contains(ev, "orders-high`") {
			t.Fatalf("the KEDAScalerFailed event does not name the Celery and the SQS queue: %s", ev)
		}
		harness.HoldReplicas(t, rw, 0, 10*time.Second)
		spub.Publish(t, "orders.high", 1, 0) // kombu creates the queue
		if _, ok := rw.WaitFor(1, 60*time.Second); !ok {
			t.Fatalf("queue created: replicas %d, want 1\n%s", rw.Current().Replicas, harness.Describe(ns, harness.ScaledObjectGVR, so.GetName()))
		}
	})
}
