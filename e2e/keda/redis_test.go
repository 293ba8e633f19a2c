package e2e

import (
	"context"
	"os"
	"sort"
	"strconv"
	"testing"
	"time"

	"github.com/celery-keda-scaler/e2e/keda/harness"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// TestRedisPushFromZero: the worker Deployment of deploy/examples/redis/worker.yaml sits at 0; one
// task published with Celery -> KEDA sets 1 replica. Each trial is a fresh namespace with the
// example's objects, and measures publish -> spec.replicas == 1 as seen through a watch.
func TestRedisPushFromZero(t *testing.T) {
	t.Parallel()
	trials := 10
	if v, err := strconv.Atoi(os.Getenv("CKS_E2E_PUSH_TRIALS")); err == nil && v > 0 {
		trials = v
	}
	broker := harness.LeaseRedisDB(t).URL
	// A scaler of the test's own: its count of open push streams is this test's alone.
	s := harness.OwnScaler(t, "scaler-push-from-zero", []string{"--result-window", harness.ScalerResultWindow.String()})
	pub := harness.NewPublisher(t, broker)
	ctx := context.Background()
	var latencies []time.Duration
	for i := 1; i <= trials; i++ {
		ns := harness.Namespace(t, harness.NSName(t, strconv.Itoa(i)))
		pub.Purge(t, "celery", "priority")
		streams, err := s.Gauge("celery_keda_streams")
		if err != nil {
			t.Fatal(err)
		}
		secret, deployment, so := harness.RedisWorkerExample(t, broker)
		harness.SetTrigger(t, so, "scalerAddress", s.Addr)
		harness.Apply(t, ns, secret, deployment, so)
		harness.WaitScaledObjectReady(t, ns, so.GetName(), 60*time.Second)
		// KEDA opened its push stream: the activation will be pushed, not found by a poll.
		s.WaitStreams(t, streams+1, 30*time.Second)
		rw := harness.WatchReplicas(t, ns, deployment.GetName())
		if c := rw.Current(); c.Replicas != 0 {
			t.Fatalf("trial %d: the Deployment has %d replicas before any task was published, want 0\n%s", i, c.Replicas, harness.Describe(ns, harness.ScaledObjectGVR, so.GetName()))
		}

		pub.Publish(t, "celery", 1, 0)
		published := time.Now()
		at, ok := rw.WaitFor(1, 30*time.Second)
		if !ok {
			t.Fatalf("trial %d: one task published, the Deployment has %d replicas after 30s, want 1\n%s", i, rw.Current().Replicas, harness.Describe(ns, harness.ScaledObjectGVR, so.GetName()))
		}
		latency := at.Sub(published)
		latencies = append(latencies, latency)
		t.Logf("trial %d: publish -> spec.replicas == 1 in %s", i, latency.Round(time.Millisecond))

		// One task, queueLength 10: exactly one replica, and it stays one (the HPA agrees).
		harness.WaitHPAMetric(t, ns, "keda-hpa-"+so.GetName(), 1)
		if c := rw.Current(); c.Replicas != 1 {
			t.Fatalf("trial %d: %d replicas for one task with queueLength 10, want 1", i, c.Replicas)
		}

		// Leave nothing active behind for the next trial.
		if err := harness.Kube.Dynamic.Resource(harness.ScaledObjectGVR).Namespace(ns).Delete(ctx, so.GetName(), metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
		pub.Purge(t, "celery", "priority")
		s.WaitStreams(t, streams, 30*time.Second)
		// A reading taken before the purge still answers an identical request for the scaler's
		// --result-window (250 ms by default): the next trial's first poll must not get it.
		time.Sleep(harness.ScalerResultWindow)
	}
	sorted := append([]time.Duration(nil), latencies...)
	sort.Slice(sorted, func(i, j int) bool { return sorted[i] < sorted[j] })
	p50, p90 := harness.Percentile(sorted, 50), harness.Percentile(sorted, 90)
	t.Logf("publish -> spec.replicas == 1 over %d trials: p50 %s, p90 %s, min %s, max %s", len(sorted),
		p50.Round(time.Millisecond), p90.Round(time.Millisecond), sorted[0].Round(time.Millisecond), sorted[len(sorted)-1].Round(time.Millisecond))
	harness.WriteResult(t, "redis_push_from_zero", map[string]any{
		"trials": len(sorted), "p50_ms": harness.Ms(p50), "p90_ms": harness.Ms(p90), "min_ms": harness.Ms(sorted[0]), "max_ms": harness.Ms(sorted[len(sorted)-1]),
		"all_ms": harness.MsAll(latencies),
	})
}

// TestRedisScaleBackToZero: tasks published, KEDA activates; a local Celery worker consumes them;
// the Deployment stays at 1 until cooldownPeriod has passed since the last active poll, then 0.
// The example's cooldownPeriod (300 s) and pollingInterval (30 s) are shortened to 20 s and 5 s so
// the scenario takes a minute; nothing else changes.
func TestRedisScaleBackToZero(t *testing.T) {
	t.Parallel()
	const cooldown, polling = 20 * time.Second, 5 * time.Second
	broker := harness.LeaseRedisDB(t).URL
	pub := harness.NewPublisher(t, broker)
	pub.Purge(t, "celery", "priority")
	ns := harness.Namespace(t, harness.NSName(t, ""))
	secret, deployment, so := harness.RedisWorkerExample(t, broker)
	harness.Set(t, so, int64(cooldown/time.Second), "spec", "cooldownPeriod")
	harness.Set(t, so, int64(polling/time.Second), "spec", "pollingInterval")
	harness.Apply(t, ns, secret, deployment, so)
	harness.WaitScaledObjectReady(t, ns, so.GetName(), 60*time.Second)
	rw := harness.WatchReplicas(t, ns, deployment.GetName())

	pub.Publish(t, "celery", 3, 0)
	if _, ok := rw.WaitFor(1, 30*time.Second); !ok {
		t.Fatalf("3 tasks published, replicas %d, want 1\n%s", rw.Current().Replicas, harness.Describe(ns, harness.ScaledObjectGVR, so.GetName()))
	}
	// The real HPA reads 3 through KEDA's metrics apiserver (3 tasks / 1 replica).
	harness.WaitHPAMetric(t, ns, "keda-hpa-"+so.GetName(), 3)

	harness.StartWorker(t, broker, []string{"celery", "priority"}, 2)
	emptied := harness.WaitDepthZero(t, broker)
	at, ok := rw.WaitFor(0, cooldown+3*polling+30*time.Second)
	if !ok {
		t.Fatalf("queue empty since %s, replicas still %d\n%s", emptied.Format(time.RFC3339Nano), rw.Current().Replicas, harness.Describe(ns, harness.ScaledObjectGVR, so.GetName()))
	}
	after := at.Sub(emptied)
	t.Logf("queue empty -> spec.replicas == 0 after %s (cooldownPeriod %s, pollingInterval %s); replica history %v", after.Round(time.Millisecond), cooldown, polling, rw.Changes())
	// KEDA scales in once cooldownPeriod has passed since the last poll that found the queue
	// active; that poll came at most one pollingInterval before the queue emptied.
	if after < cooldown-polling {
		t.Fatalf("scaled to 0 %s after the queue emptied: before cooldownPeriod %s (minus one pollingInterval)", after, cooldown)
	}
	for _, c := range rw.Changes() {
		if c.Replicas > 1 {
			t.Fatalf("the Deployment went to %d replicas for 3 tasks with queueLength 10: %v", c.Replicas, rw.Changes())
		}
	}
}
