package e2e

import (
	"fmt"
	"testing"
	"time"

	"github.com/celery-keda-scaler/e2e/keda/harness"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
)

// builtinRabbit is a copy of the example's Deployment scaled by KEDA's own `rabbitmq` scaler
// (QueueLength over AMQP, as a user would set it).
func builtinRabbit(t testing.TB, deployment *unstructured.Unstructured, amqp, queue string, value int, cooldown, polling int64) (dep, so *unstructured.Unstructured) {
	t.Helper()
	dep = harness.CopyDeployment(t, deployment, "builtin-rabbitmq-worker")
	return dep, harness.NewScaledObject(dep.GetName(), dep.GetName(), "rabbitmq", polling, cooldown, map[string]any{
		"host": amqp, "queueName": queue, "mode": "QueueLength", "value": fmt.Sprint(value), "protocol": "amqp",
	})
}

// TestRabbitMQHPAScalesWithReservedTasks: 47 long tasks, a worker with concurrency 2 and prefetch
// multiplier 4 takes 2 (acknowledged at start) and holds 8 unacknowledged: ready 37. Ours counts
// 37 + 8 + 2 = 47 -> exactly ceil(47/5) = 10 replicas; KEDA's `rabbitmq` scaler (AMQP queue length)
// counts the 37 ready -> 8.
func TestRabbitMQHPAScalesWithReservedTasks(t *testing.T) {
	t.Parallel()
	ns := harness.Namespace(t, harness.NSName(t, ""))
	b := harness.NewExampleBroker(t, "rabbitmq", ns) // its ScaledObject reads `celery`
	amqp := b.Broker
	pub := b.Publisher(t)
	secret, deployment, so := b.WorkerExample(t)
	harness.SetTrigger(t, so, "queueLength", "5")
	harness.Set(t, so, int64(5), "spec", "pollingInterval")
	bDep, bSO := builtinRabbit(t, deployment, amqp, "celery", 5, 300, 5)
	pub.Publish(t, "celery", 47, 120) // declares the queue; nothing finishes during the test
	harness.StartWorkerEnv(t, amqp, []string{"celery"}, 2, "CKS_PREFETCH=4")
	harness.Apply(t, ns, secret, deployment, so, bDep, bSO)
	harness.WaitScaledObjectReady(t, ns, so.GetName(), 60*time.Second)
	harness.WaitScaledObjectReady(t, ns, bSO.GetName(), 60*time.Second)
	ours, builtin := harness.WatchReplicas(t, ns, deployment.GetName()), harness.WatchReplicas(t, ns, bDep.GetName())
	if _, ok := ours.WaitFor(10, 120*time.Second); !ok {
		t.Fatalf("47 tasks (37 ready, 8 reserved, 2 running): replicas %d, want 10; %v\n%s", ours.Current().Replicas, ours.Changes(), harness.Describe(ns, harness.ScaledObjectGVR, so.GetName()))
	}
	if _, ok := builtin.WaitFor(8, 120*time.Second); !ok {
		t.Fatalf("KEDA's rabbitmq scaler: replicas %d, want 8 (37 ready); %v\n%s", builtin.Current().Replicas, builtin.Changes(), harness.Describe(ns, harness.ScaledObjectGVR, bSO.GetName()))
	}
	t.Logf("ours %v; KEDA's rabbitmq scaler %v", ours.Changes(), builtin.Changes())
	harness.WriteResult(t, "rabbitmq_hpa_reserved", map[string]any{"ours_replicas": 10, "builtin_rabbitmq_replicas": builtin.Current().Replicas})
	pub.Purge(t, "celery")
}

// TestRabbitMQNeverToZeroUnderRunningTasks: as the Redis scenario, on RabbitMQ: two 45 s early-ack
// tasks run, the queue is empty; ours keeps 1 replica until they finish, KEDA's `rabbitmq`
// scaler goes to 0 under them.
func TestRabbitMQNeverToZeroUnderRunningTasks(t *testing.T) {
	t.Parallel()
	const cooldown, polling, taskSeconds = 10, 5, 45
	ns := harness.Namespace(t, harness.NSName(t, ""))
	b := harness.NewExampleBroker(t, "rabbitmq", ns) // its ScaledObject reads `celery`
	amqp := b.Broker
	pub := b.Publisher(t)
	secret, deployment, so := b.WorkerExample(t)
	harness.Set(t, so, int64(cooldown), "spec", "cooldownPeriod")
	harness.Set(t, so, int64(polling), "spec", "pollingInterval")
	bDep, bSO := builtinRabbit(t, deployment, amqp, "celery", 10, cooldown, polling)
	marker := fmt.Sprintf("cks-e2e-started-%d", time.Now().UnixNano())
	pub.Do(t, map[string]any{"op": "publish", "queue": "celery", "count": 2, "seconds": taskSeconds, "marker": marker})
	harness.Apply(t, ns, secret, deployment, so, bDep, bSO)
	harness.WaitScaledObjectReady(t, ns, so.GetName(), 60*time.Second)
	harness.WaitScaledObjectReady(t, ns, bSO.GetName(), 60*time.Second)
	ours, builtin := harness.WatchReplicas(t, ns, deployment.GetName()), harness.WatchReplicas(t, ns, bDep.GetName())
	for name, rw := range map[string]*harness.ReplicaWatch{"ours": ours, "KEDA's rabbitmq scaler": builtin} {
		if _, ok := rw.WaitFor(1, 30*time.Second); !ok {
			t.Fatalf("%s: two tasks queued, replicas %d, want 1", name, rw.Current().Replicas)
		}
	}
	markerDB := harness.LeaseRedisDB(t).URL
	markers := harness.NewPublisher(t, markerDB)
	harness.StartWorkerEnv(t, amqp, []string{"celery"}, 2, "CKS_MARKER_REDIS="+markerDB)
	markers.WaitStarted(t, marker, 2)
	started := time.Now()
	ended := b.WaitDrained(t)
	if ended.Before(started.Add((taskSeconds - 2) * time.Second)) {
		t.Fatalf("the scaler read 0 at %s, before the tasks could finish", ended.Format("15:04:05"))
	}
	for _, c := range ours.Changes() {
		if c.Replicas == 0 && c.At.After(started) && c.At.Before(ended) {
			t.Fatalf("ours went to 0 at %s while tasks ran: %v", c.At.Format("15:04:05.000"), ours.Changes())
		}
	}
	if _, ok := ours.WaitFor(0, time.Duration(cooldown+3*polling+30)*time.Second); !ok {
		t.Fatalf("tasks done, replicas still %d", ours.Current().Replicas)
	}
	exposed := 0.0
	for _, c := range builtin.Changes() {
		if c.Replicas == 0 && c.At.After(started) && c.At.Before(ended) {
			exposed = ended.Sub(c.At).Seconds()
			break
		}
	}
	t.Logf("ours %v; KEDA's rabbitmq scaler %v, scaled in under running tasks for %.1f s", ours.Changes(), builtin.Changes(), exposed)
	harness.WriteResult(t, "rabbitmq_running_tasks", map[string]any{"ours_exposed_s": 0, "builtin_rabbitmq_exposed_s": exposed})
	if exposed == 0 {
		t.Fatalf("KEDA's rabbitmq scaler was expected to scale in while the tasks ran: %v", builtin.Changes())
	}
}
