package e2e

import (
	"context"
	"net/http"
	"os"
	"strings"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// rabbitVhost creates a vhost of this test on the suite's RabbitMQ (guest may use it) and returns
// its AMQP URL and the management API's base URL.
func rabbitVhost(t testing.TB, name string) (amqpURL, managementURL string) {
	t.Helper()
	mgmt := strings.TrimRight(os.Getenv("CKS_RABBITMQ_MANAGEMENT_URL"), "/")
	base := strings.TrimRight(os.Getenv("CKS_AMQP_URL"), "/")
	if mgmt == "" || base == "" {
		t.Fatal("CKS_RABBITMQ_MANAGEMENT_URL and CKS_AMQP_URL must be set (scripts/test.sh sets them)")
	}
	do := func(method, path, body string) {
		req, _ := http.NewRequest(method, mgmt+path, strings.NewReader(body))
		req.SetBasicAuth("guest", "guest")
		req.Header.Set("Content-Type", "application/json")
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatalf("RabbitMQ management %s %s: %v", method, path, err)
		}
		resp.Body.Close()
		if resp.StatusCode >= 300 {
			t.Fatalf("RabbitMQ management %s %s: HTTP %d", method, path, resp.StatusCode)
		}
	}
	do("PUT", "/api/vhosts/"+name, "")
	do("PUT", "/api/permissions/"+name+"/guest", `{"configure":".*","write":".*","read":".*"}`)
	t.Cleanup(func() { do("DELETE", "/api/vhosts/"+name, "") })
	// CKS_AMQP_URL ends in the default vhost ("//"): replace it.
	return strings.TrimSuffix(base, "/") + "/" + name, mgmt
}

// TestMistakesAreShownAndFixed: what a user sees for three mistakes, and that fixing each scales.
//   - `queueLength: abc` (GetMetricSpec refuses): Ready=False, the scaler's message naming the key
//     in the operator's log, no replica change while a task waits; fixed -> 1 replica.
//   - a broker URL with an unknown scheme behind brokerUrlFromEnv: the same; fixed Secret -> 1.
//   - a queue missing on RabbitMQ (a reading fails): KEDAScalerFailed event with NOT_FOUND naming
//     the queue; the queue declared by Celery -> 1.
//   - a queue missing on SQS: the same, naming the Celery queue and the SQS queue it maps to;
//     the queue created by Celery -> 1.
func TestMistakesAreShownAndFixed(t *testing.T) {
	broker := e2eBroker()
	pub := newPublisher(t, broker)
	pub.purge(t, "celery", "priority")
	pub.publish(t, "celery", 1, 0)
	t.Cleanup(func() { pub.purge(t, "celery", "priority") })

	t.Run("queueLength", func(t *testing.T) {
		ns := namespace(t, nsName(t, ""))
		secret, deployment, so := exampleWorker(t)
		setTrigger(t, so, "queueLength", "abc")
		apply(t, ns, secret, deployment, so)
		rw := watchReplicas(t, ns, deployment.GetName())
		waitNotReady(t, ns, so.GetName(), "no metric specs returned from scalers")
		line := waitLogLine(t, kube.OperatorLog, `"namespace": "`+ns+`"`, "code = InvalidArgument desc = metadata key `queueLength`", 30*time.Second)
		t.Logf("operator log: %.400s", line)
		holdReplicas(t, rw, 0, 10*time.Second)
		setTrigger(t, so, "queueLength", "10")
		apply(t, ns, so)
		if _, ok := rw.waitFor(1, 60*time.Second); !ok {
			t.Fatalf("queueLength fixed: replicas %d, want 1\n%s", rw.current().Replicas, describe(ns, scaledObjectGVR, so.GetName()))
		}
	})

	t.Run("brokerScheme", func(t *testing.T) {
		ns := namespace(t, nsName(t, ""))
		secret, deployment, so := exampleWorker(t)
		set(t, secret, "mongodb://127.0.0.1:27017/0", "stringData", "url")
		apply(t, ns, secret, deployment, so)
		rw := watchReplicas(t, ns, deployment.GetName())
		waitNotReady(t, ns, so.GetName(), "no metric specs returned from scalers")
		line := waitLogLine(t, kube.OperatorLog, `"namespace": "`+ns+`"`, "code = InvalidArgument desc = metadata key `brokerUrlFromEnv`", 30*time.Second)
		t.Logf("operator log: %.400s", line)
		holdReplicas(t, rw, 0, 10*time.Second)
		set(t, secret, broker, "stringData", "url")
		apply(t, ns, secret)
		// KEDA v2.20 keeps the environment it resolved for the failed scaler through its retries
		// and through a change of annotations (measured: the old URL was still sent 70 s later);
		// a change of the ScaledObject's spec makes it build the scaler again (README,
		// Troubleshooting).
		set(t, so, int64(31), "spec", "pollingInterval")
		apply(t, ns, so)
		if _, ok := rw.waitFor(1, 60*time.Second); !ok {
			t.Fatalf("Secret fixed: replicas %d, want 1\n%s", rw.current().Replicas, describe(ns, scaledObjectGVR, so.GetName()))
		}
	})

	t.Run("missingRabbitQueue", func(t *testing.T) {
		ns := namespace(t, nsName(t, ""))
		amqp, mgmt := rabbitVhost(t, ns)
		objs := readExample(t, "deploy/examples/rabbitmq/worker.yaml")
		secret, deployment, so := find(t, objs, "Secret"), find(t, objs, "Deployment"), find(t, objs, "ScaledObject")
		set(t, secret, amqp, "stringData", "url")
		setImage(t, deployment)
		setTrigger(t, so, "scalerAddress", scaler.Addr)
		setTrigger(t, so, "managementUrl", mgmt)
		set(t, so, int64(5), "spec", "pollingInterval")
		rpub := newPublisher(t, amqp)
		rpub.publish(t, "celery", 1, 0) // declares `celery`; `priority` does not exist yet
		apply(t, ns, secret, deployment, so)
		rw := watchReplicas(t, ns, deployment.GetName())
		ev := waitEvent(t, ns, "KEDAScalerFailed", "NotFound", 60*time.Second)
		t.Logf("event: %s", ev)
		if !strings.Contains(ev, "priority") {
			t.Fatalf("the KEDAScalerFailed event does not name the missing queue: %s", ev)
		}
		holdReplicas(t, rw, 0, 10*time.Second)
		rpub.publish(t, "priority", 1, 0)
		if _, ok := rw.waitFor(1, 60*time.Second); !ok {
			t.Fatalf("queue declared: replicas %d, want 1\n%s", rw.current().Replicas, describe(ns, scaledObjectGVR, so.GetName()))
		}
		rpub.purge(t, "celery", "priority")
	})

	t.Run("missingSQSQueue", func(t *testing.T) {
		ns := namespace(t, nsName(t, ""))
		b := newExampleBroker(t, "sqs", ns)
		secret, deployment, so := b.workerExample(t)
		setTrigger(t, so, "queues", "celery,orders.high")
		set(t, so, int64(5), "spec", "pollingInterval")
		spub := b.publisher(t)
		spub.publish(t, "celery", 1, 0) // creates `<prefix>celery`; `<prefix>orders-high` does not exist yet
		apply(t, ns, secret, deployment, so)
		rw := watchReplicas(t, ns, deployment.GetName())
		ev := waitEvent(t, ns, "KEDAScalerFailed", "NotFound", 60*time.Second)
		t.Logf("event: %s", ev)
		// Both names: the Celery queue the user wrote and the SQS queue kombu would use.
		if !strings.Contains(ev, "`orders.high`") || !strings.Contains(ev, "orders-high`") {
			t.Fatalf("the KEDAScalerFailed event does not name the Celery and the SQS queue: %s", ev)
		}
		holdReplicas(t, rw, 0, 10*time.Second)
		spub.publish(t, "orders.high", 1, 0) // kombu creates the queue
		if _, ok := rw.waitFor(1, 60*time.Second); !ok {
			t.Fatalf("queue created: replicas %d, want 1\n%s", rw.current().Replicas, describe(ns, scaledObjectGVR, so.GetName()))
		}
	})
}

// holdReplicas checks spec.replicas stays want for the whole period.
func holdReplicas(t testing.TB, rw *replicaWatch, want int32, period time.Duration) {
	t.Helper()
	start := time.Now()
	time.Sleep(period)
	for _, c := range rw.changes() {
		if c.At.After(start) || rw.current().Replicas != want {
			t.Fatalf("replicas changed while the mistake was in place: %v (want %d throughout)", rw.changes(), want)
		}
	}
}

// waitEvent waits for an event with the reason whose message contains substr, and returns it.
func waitEvent(t testing.TB, ns, reason, substr string, timeout time.Duration) string {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		evs, err := kube.Client.CoreV1().Events(ns).List(context.Background(), metav1.ListOptions{FieldSelector: "reason=" + reason})
		if err == nil {
			for _, e := range evs.Items {
				if strings.Contains(e.Message, substr) {
					return e.Message
				}
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("no %s event containing %q in %s within %s", reason, substr, ns, timeout)
		}
		time.Sleep(200 * time.Millisecond)
	}
}
