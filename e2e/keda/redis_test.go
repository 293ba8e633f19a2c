package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
)

// scalerResultWindow is the suite's scaler's --result-window (its default, set explicitly).
const scalerResultWindow = 250 * time.Millisecond

// The Redis database the KEDA scenarios use (CKS_E2E_REDIS_DB, default 15); the Rust suites use
// unique keys elsewhere. Two suites running at once on one Redis need different databases.
var e2eRedisDB = func() int {
	if v, err := strconv.Atoi(os.Getenv("CKS_E2E_REDIS_DB")); err == nil {
		return v
	}
	return 15
}()

// e2eBroker is the suite's Redis database as a Celery broker URL.
func e2eBroker() string { return fmt.Sprintf("%s/%d", redisURL, e2eRedisDB) }

// exampleWorker loads deploy/examples/redis/worker.yaml with only what this machine needs changed:
// the broker URL in the Secret (our Redis), the image (never pulled: no kubelet) and scalerAddress.
func exampleWorker(t testing.TB) (secret, deployment, scaledObject *unstructured.Unstructured) {
	t.Helper()
	objs := readExample(t, "deploy/examples/redis/worker.yaml")
	if len(objs) != 3 {
		t.Fatalf("deploy/examples/redis/worker.yaml has %d objects, the scenario expects Secret, Deployment, ScaledObject", len(objs))
	}
	secret, deployment, scaledObject = find(t, objs, "Secret"), find(t, objs, "Deployment"), find(t, objs, "ScaledObject")
	set(t, secret, e2eBroker(), "stringData", "url")
	setImage(t, deployment)
	setTrigger(t, scaledObject, "scalerAddress", scaler.Addr)
	return secret, deployment, scaledObject
}

// waitStreams waits until the scaler has exactly n open StreamIsActive streams.
func waitStreams(t testing.TB, n float64, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		got, err := scaler.gauge("celery_keda_streams")
		if err == nil && got == n {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("the scaler has %v open push streams (err %v), want %v within %s", got, err, n, timeout)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestRedisPushFromZero: the worker Deployment of deploy/examples/redis/worker.yaml sits at 0; one
// task published with Celery -> KEDA sets 1 replica. Each trial is a fresh namespace with the
// example's objects, and measures publish -> spec.replicas == 1 as seen through a watch.
func TestRedisPushFromZero(t *testing.T) {
	trials := 10
	if v, err := strconv.Atoi(os.Getenv("CKS_E2E_PUSH_TRIALS")); err == nil && v > 0 {
		trials = v
	}
	broker := e2eBroker()
	pub := newPublisher(t, broker)
	ctx := context.Background()
	var latencies []time.Duration
	for i := 1; i <= trials; i++ {
		ns := namespace(t, nsName(t, strconv.Itoa(i)))
		pub.purge(t, "celery", "priority")
		streams, err := scaler.gauge("celery_keda_streams")
		if err != nil {
			t.Fatal(err)
		}
		secret, deployment, so := exampleWorker(t)
		apply(t, ns, secret, deployment, so)
		waitScaledObjectReady(t, ns, so.GetName(), 60*time.Second)
		// KEDA opened its push stream: the activation will be pushed, not found by a poll.
		waitStreams(t, streams+1, 30*time.Second)
		rw := watchReplicas(t, ns, deployment.GetName())
		if c := rw.current(); c.Replicas != 0 {
			t.Fatalf("trial %d: the Deployment has %d replicas before any task was published, want 0\n%s", i, c.Replicas, describe(ns, scaledObjectGVR, so.GetName()))
		}

		pub.publish(t, "celery", 1, 0)
		published := time.Now()
		at, ok := rw.waitFor(1, 30*time.Second)
		if !ok {
			t.Fatalf("trial %d: one task published, the Deployment has %d replicas after 30s, want 1\n%s", i, rw.current().Replicas, describe(ns, scaledObjectGVR, so.GetName()))
		}
		latency := at.Sub(published)
		latencies = append(latencies, latency)
		t.Logf("trial %d: publish -> spec.replicas == 1 in %s", i, latency.Round(time.Millisecond))

		// One task, queueLength 10: exactly one replica, and it stays one (the HPA agrees).
		waitHPAMetric(t, ns, "keda-hpa-"+so.GetName(), 1)
		if c := rw.current(); c.Replicas != 1 {
			t.Fatalf("trial %d: %d replicas for one task with queueLength 10, want 1", i, c.Replicas)
		}

		// Leave nothing active behind for the next trial.
		if err := kube.Dynamic.Resource(scaledObjectGVR).Namespace(ns).Delete(ctx, so.GetName(), metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
		pub.purge(t, "celery", "priority")
		waitStreams(t, streams, 30*time.Second)
		// A reading taken before the purge still answers an identical request for the scaler's
		// --result-window (250 ms by default): the next trial's first poll must not get it.
		time.Sleep(scalerResultWindow)
	}
	sorted := append([]time.Duration(nil), latencies...)
	sort.Slice(sorted, func(i, j int) bool { return sorted[i] < sorted[j] })
	p50, p90 := percentile(sorted, 50), percentile(sorted, 90)
	t.Logf("publish -> spec.replicas == 1 over %d trials: p50 %s, p90 %s, min %s, max %s", len(sorted),
		p50.Round(time.Millisecond), p90.Round(time.Millisecond), sorted[0].Round(time.Millisecond), sorted[len(sorted)-1].Round(time.Millisecond))
	writeResult(t, "redis_push_from_zero", map[string]any{
		"trials": len(sorted), "p50_ms": ms(p50), "p90_ms": ms(p90), "min_ms": ms(sorted[0]), "max_ms": ms(sorted[len(sorted)-1]),
		"all_ms": msAll(latencies),
	})
}

// waitHPAMetric waits until the HPA KEDA made reports the external metric (read from the scaler
// through KEDA's metrics apiserver) as want per replica.
func waitHPAMetric(t testing.TB, ns, name string, want int64) {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for {
		h, err := kube.Client.AutoscalingV2().HorizontalPodAutoscalers(ns).Get(context.Background(), name, metav1.GetOptions{})
		if err == nil {
			for _, m := range h.Status.CurrentMetrics {
				if m.External != nil && m.External.Current.AverageValue != nil && m.External.Current.AverageValue.Value() == want {
					return
				}
			}
		}
		if time.Now().After(deadline) {
			st := ""
			if h != nil {
				b, _ := json.Marshal(h.Status)
				st = string(b)
			}
			t.Fatalf("HPA %s/%s does not report the external metric at %d per replica within 60s (err %v): %s", ns, name, want, err, st)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// TestRedisScaleBackToZero: tasks published, KEDA activates; a local Celery worker consumes them;
// the Deployment stays at 1 until cooldownPeriod has passed since the last active poll, then 0.
// The example's cooldownPeriod (300 s) and pollingInterval (30 s) are shortened to 20 s and 5 s so
// the scenario takes a minute; nothing else changes.
func TestRedisScaleBackToZero(t *testing.T) {
	const cooldown, polling = 20 * time.Second, 5 * time.Second
	broker := e2eBroker()
	pub := newPublisher(t, broker)
	pub.purge(t, "celery", "priority")
	ns := namespace(t, nsName(t, ""))
	secret, deployment, so := exampleWorker(t)
	set(t, so, int64(cooldown/time.Second), "spec", "cooldownPeriod")
	set(t, so, int64(polling/time.Second), "spec", "pollingInterval")
	apply(t, ns, secret, deployment, so)
	waitScaledObjectReady(t, ns, so.GetName(), 60*time.Second)
	rw := watchReplicas(t, ns, deployment.GetName())

	pub.publish(t, "celery", 3, 0)
	if _, ok := rw.waitFor(1, 30*time.Second); !ok {
		t.Fatalf("3 tasks published, replicas %d, want 1\n%s", rw.current().Replicas, describe(ns, scaledObjectGVR, so.GetName()))
	}
	// The real HPA reads 3 through KEDA's metrics apiserver (3 tasks / 1 replica).
	waitHPAMetric(t, ns, "keda-hpa-"+so.GetName(), 3)

	startWorker(t, broker, []string{"celery", "priority"}, 2)
	emptied := waitDepthZero(t, broker)
	at, ok := rw.waitFor(0, cooldown+3*polling+30*time.Second)
	if !ok {
		t.Fatalf("queue empty since %s, replicas still %d\n%s", emptied.Format(time.RFC3339Nano), rw.current().Replicas, describe(ns, scaledObjectGVR, so.GetName()))
	}
	after := at.Sub(emptied)
	t.Logf("queue empty -> spec.replicas == 0 after %s (cooldownPeriod %s, pollingInterval %s); replica history %v", after.Round(time.Millisecond), cooldown, polling, rw.changes())
	// KEDA scales in once cooldownPeriod has passed since the last poll that found the queue
	// active; that poll came at most one pollingInterval before the queue emptied.
	if after < cooldown-polling {
		t.Fatalf("scaled to 0 %s after the queue emptied: before cooldownPeriod %s (minus one pollingInterval)", after, cooldown)
	}
	for _, c := range rw.changes() {
		if c.Replicas > 1 {
			t.Fatalf("the Deployment went to %d replicas for 3 tasks with queueLength 10: %v", c.Replicas, rw.changes())
		}
	}
}

// waitDepthZero waits until the scaler reads 0 for the example's trigger (the worker finished
// every task), using the scaler's own probe command, and returns when it first did.
func waitDepthZero(t testing.TB, broker string) time.Time {
	t.Helper()
	return waitDepthZeroQueues(t, broker, "celery,priority")
}

// waitDepthZeroQueues is waitDepthZero for other queues and extra probe metadata.
func waitDepthZeroQueues(t testing.TB, broker, queues string, extra ...string) time.Time {
	t.Helper()
	deadline := time.Now().Add(90 * time.Second)
	for {
		depth, err := probeDepth(broker, queues, extra...)
		if err == nil && depth == 0 {
			return time.Now()
		}
		if time.Now().After(deadline) {
			t.Fatalf("the queues did not empty within 60s (depth %d, err %v)", depth, err)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func percentile(sorted []time.Duration, p int) time.Duration {
	// Nearest rank.
	idx := (p*len(sorted)+99)/100 - 1
	if idx < 0 {
		idx = 0
	}
	return sorted[idx]
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

func msAll(ds []time.Duration) []float64 {
	out := make([]float64, len(ds))
	for i, d := range ds {
		out[i] = ms(d)
	}
	return out
}

// writeResult appends a scenario's figures to $CKS_E2E_RESULTS (JSON lines), for docs/BENCHMARKS.md.
func writeResult(t testing.TB, name string, fields map[string]any) {
	t.Helper()
	path := os.Getenv("CKS_E2E_RESULTS")
	if path == "" {
		path = filepath.Join(workDir, "results.jsonl")
	}
	fields["scenario"] = name
	fields["at"] = time.Now().UTC().Format(time.RFC3339)
	b, _ := json.Marshal(fields)
	f, err := os.OpenFile(path, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	_, _ = f.Write(append(b, '\n'))
}

// probeDepth runs the scaler's `probe` command (one reading with the default counters: ready, in
// flight and running) and returns the total over the queues.
func probeDepth(broker, queues string, extra ...string) (int, error) {
	args := append([]string{"probe", "brokerUrl=" + broker, "queues=" + queues}, extra...)
	out, err := exec.Command(os.Getenv("CKS_SCALER_BIN"), args...).CombinedOutput()
	if err != nil {
		return -1, fmt.Errorf("probe: %v: %s", err, out)
	}
	total, seen := 0, 0
	for _, line := range strings.Split(string(out), "\n") {
		if m := probeQueueLine.FindStringSubmatch(line); m != nil {
			n, _ := strconv.Atoi(m[1])
			total += n
			seen++
		}
	}
	if seen == 0 {
		return -1, fmt.Errorf("probe printed no queue lines: %s", out)
	}
	return total, nil
}

var probeQueueLine = regexp.MustCompile(`^queue \S+: (\d+)$`)
