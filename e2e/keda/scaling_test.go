package e2e

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/celery-keda-scaler/e2e/keda/harness"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
)

// builtinRedisMetadata is KEDA's own `redis` scaler on a list of a leased database.
func builtinRedisMetadata(db harness.RedisDB, list string, listLength int) map[string]any {
	return map[string]any{
		"address":       strings.TrimPrefix(harness.RedisURL, "redis://"),
		"listName":      list,
		"listLength":    fmt.Sprint(listLength),
		"databaseIndex": fmt.Sprint(db.Index),
	}
}

// builtinRedis is a copy of the example's Deployment scaled by KEDA's own `redis` scaler on the
// same list: the comparison the README's table makes, measured in the same run.
func builtinRedis(t testing.TB, db harness.RedisDB, deployment *unstructured.Unstructured, list string, listLength int, cooldown, polling int64) (dep, so *unstructured.Unstructured) {
	t.Helper()
	dep = harness.CopyDeployment(t, deployment, "builtin-redis-worker")
	return dep, harness.NewScaledObject(dep.GetName(), dep.GetName(), "redis", polling, cooldown, builtinRedisMetadata(db, list, listLength))
}

// TestRedisHPAScalesToExactReplicas: 47 tasks, queueLength 5 -> the real HPA takes the Deployment
// to exactly ceil(47/5) = 10 replicas, and down to 0 when a worker drains the queue. KEDA's
// built-in `redis` scaler watches the same state: 20 tasks at priority 0 and 27 at priority 9 put
// 20 in the list it reads (`celery`) and 27 in `celery\x06\x169`, so it asks for ceil(20/5) = 4.
func TestRedisHPAScalesToExactReplicas(t *testing.T) {
	t.Parallel()
	db := harness.LeaseRedisDB(t)
	broker := db.URL
	pub := harness.NewPublisher(t, broker)
	pub.Purge(t, "celery", "priority")
	ns := harness.Namespace(t, harness.NSName(t, ""))
	secret, deployment, so := harness.RedisWorkerExample(t, broker)
	harness.SetTrigger(t, so, "queueLength", "5")
	harness.Set(t, so, int64(20), "spec", "cooldownPeriod")
	harness.Set(t, so, int64(5), "spec", "pollingInterval")
	bDep, bSO := builtinRedis(t, db, deployment, "celery", 5, 20, 5)
	harness.Apply(t, ns, secret, deployment, so, bDep, bSO)
	harness.WaitScaledObjectReady(t, ns, so.GetName(), 60*time.Second)
	harness.WaitScaledObjectReady(t, ns, bSO.GetName(), 60*time.Second)
	ours, builtin := harness.WatchReplicas(t, ns, deployment.GetName()), harness.WatchReplicas(t, ns, bDep.GetName())

	pub.Do(t, map[string]any{"op": "publish", "queue": "celery", "count": 20, "priority": 0})
	pub.Do(t, map[string]any{"op": "publish", "queue": "celery", "count": 27, "priority": 9})
	start := time.Now()
	if _, ok := ours.WaitFor(10, 120*time.Second); !ok {
		t.Fatalf("47 tasks, queueLength 5: replicas %d, want 10; history %v\n%s", ours.Current().Replicas, ours.Changes(), harness.Describe(ns, harness.ScaledObjectGVR, so.GetName()))
	}
	if _, ok := builtin.WaitFor(4, 120*time.Second); !ok {
		t.Fatalf("KEDA's redis scaler: replicas %d, want 4 (20 tasks in the list it reads); history %v\n%s", builtin.Current().Replicas, builtin.Changes(), harness.Describe(ns, harness.ScaledObjectGVR, bSO.GetName()))
	}
	harness.WaitHPAMetric(t, ns, "keda-hpa-"+so.GetName(), 5) // 47 / 10 replicas, rounded up by the HPA's quantity
	t.Logf("47 tasks: ours %v; KEDA's redis scaler %v (%s after publishing)", ours.Changes(), builtin.Changes(), time.Since(start).Round(time.Second))
	for _, c := range ours.Changes() {
		if c.Replicas > 10 {
			t.Fatalf("our Deployment went past 10 replicas: %v", ours.Changes())
		}
	}
	harness.WriteResult(t, "redis_hpa_47_tasks", map[string]any{"ours_replicas": 10, "builtin_redis_replicas": builtin.Current().Replicas})

	// A worker drains the queue: down to 0 (HPA down to 1, then KEDA after cooldownPeriod).
	harness.StartWorker(t, broker, []string{"celery", "priority"}, 4)
	if _, ok := ours.WaitFor(0, 180*time.Second); !ok {
		t.Fatalf("queue drained: replicas %d, want 0; history %v\n%s", ours.Current().Replicas, ours.Changes(), harness.Describe(ns, harness.ScaledObjectGVR, so.GetName()))
	}
	t.Logf("drained: %v", ours.Changes())
}

// TestRedisNeverToZeroUnderRunningTasks: two long early-ack tasks run on a local worker and the
// queue is empty. Our ScaledObject keeps 1 replica through several cooldownPeriods and reaches 0
// only after they finish; KEDA's built-in `redis` scaler on the same state goes to 0 while they run.
func TestRedisNeverToZeroUnderRunningTasks(t *testing.T) {
	t.Parallel()
	const cooldown, polling, taskSeconds = 10, 5, 45
	db := harness.LeaseRedisDB(t)
	broker := db.URL
	pub := harness.NewPublisher(t, broker)
	pub.Purge(t, "celery", "priority")
	ns := harness.Namespace(t, harness.NSName(t, ""))
	secret, deployment, so := harness.RedisWorkerExample(t, broker)
	harness.Set(t, so, int64(cooldown), "spec", "cooldownPeriod")
	harness.Set(t, so, int64(polling), "spec", "pollingInterval")
	bDep, bSO := builtinRedis(t, db, deployment, "celery", 10, cooldown, polling)
	harness.Apply(t, ns, secret, deployment, so, bDep, bSO)
	harness.WaitScaledObjectReady(t, ns, so.GetName(), 60*time.Second)
	harness.WaitScaledObjectReady(t, ns, bSO.GetName(), 60*time.Second)
	ours, builtin := harness.WatchReplicas(t, ns, deployment.GetName()), harness.WatchReplicas(t, ns, bDep.GetName())

	// The tasks wait in the queue until both scalers have activated, then a worker takes them.
	marker := fmt.Sprintf("cks-e2e-started-%d", time.Now().UnixNano())
	pub.Do(t, map[string]any{"op": "publish", "queue": "celery", "count": 2, "seconds": taskSeconds, "marker": marker})
	if _, ok := ours.WaitFor(1, 30*time.Second); !ok {
		t.Fatalf("two tasks queued: replicas %d, want 1\n%s", ours.Current().Replicas, harness.Describe(ns, harness.ScaledObjectGVR, so.GetName()))
	}
	if _, ok := builtin.WaitFor(1, 30*time.Second); !ok {
		t.Fatalf("two tasks queued: KEDA's redis scaler has %d replicas, want 1\n%s", builtin.Current().Replicas, harness.Describe(ns, harness.ScaledObjectGVR, bSO.GetName()))
	}
	harness.StartWorker(t, broker, []string{"celery", "priority"}, 2)
	pub.WaitStarted(t, marker, 2)
	started := time.Now()
	depth, err := harness.ProbeDepth(broker, "celery,priority")
	if err != nil || depth != 2 {
		t.Fatalf("probe while two tasks run: %d (err %v), want 2", depth, err)
	}
	// Both tasks run for taskSeconds (45 s = 4.5 cooldownPeriods).
	finished := started.Add(taskSeconds * time.Second)
	ended := harness.WaitDepthZero(t, broker)
	if ended.Before(finished.Add(-2 * time.Second)) {
		t.Fatalf("the scaler read 0 at %s, before the tasks could finish (%s)", ended, finished)
	}
	for _, c := range ours.Changes() {
		if c.Replicas == 0 && c.At.After(started) && c.At.Before(ended) {
			t.Fatalf("our Deployment went to 0 at %s while tasks ran (until %s): %v", c.At.Format("15:04:05.000"), ended.Format("15:04:05.000"), ours.Changes())
		}
	}
	at, ok := ours.WaitFor(0, time.Duration(cooldown+3*polling+30)*time.Second)
	if !ok {
		t.Fatalf("tasks done at %s, replicas still %d\n%s", ended.Format("15:04:05.000"), ours.Current().Replicas, harness.Describe(ns, harness.ScaledObjectGVR, so.GetName()))
	}
	var builtinZero time.Time
	for _, c := range builtin.Changes() {
		if c.Replicas == 0 && c.At.After(started) {
			builtinZero = c.At
			break
		}
	}
	exposed := 0.0
	if !builtinZero.IsZero() && builtinZero.Before(ended) {
		exposed = ended.Sub(builtinZero).Seconds()
	}
	t.Logf("tasks ran %s -> %s; ours reached 0 %s after they ended (%v); KEDA's redis scaler: %v, scaled in under running tasks for %.1f s",
		started.Format("15:04:05"), ended.Format("15:04:05"), at.Sub(ended).Round(time.Millisecond), ours.Changes(), builtin.Changes(), exposed)
	harness.WriteResult(t, "redis_running_tasks", map[string]any{"ours_exposed_s": 0, "builtin_redis_exposed_s": exposed})
	if builtinZero.IsZero() || !builtinZero.Before(ended) {
		t.Fatalf("KEDA's redis scaler was expected to scale in while the tasks ran (its list is empty): %v", builtin.Changes())
	}
}

// TestScaledJobRecipe: the README's ScaledJob recipe (deploy/examples/<broker>/scaledjob.yaml) on
// each broker. Jobs never run here (no kubelet), so each stays running and the tasks stay queued:
// 5 tasks -> exactly 5 Jobs, still 5 after three polling intervals; 3 more tasks -> 8.
func TestScaledJobRecipe(t *testing.T) {
	t.Parallel()
	harness.ForEachBroker(t, func(t *testing.T, b harness.ExampleBroker, ns string) {
		pub := b.Publisher(t)
		pub.Purge(t, "reports") // on SQS this creates the queue, which the scaler reads from the start
		objs, sj := b.ScaledJobExample(t)
		harness.Apply(t, ns, objs...)
		polling, _, _ := unstructured.NestedInt64(sj.Object, "spec", "pollingInterval")

		pub.Publish(t, "reports", 5, 0)
		harness.WaitJobs(t, ns, sj.GetName(), 5, 60*time.Second)
		harness.HoldJobs(t, ns, sj.GetName(), 5, time.Duration(3*polling+2)*time.Second)
		pub.Publish(t, "reports", 3, 0)
		harness.WaitJobs(t, ns, sj.GetName(), 8, 60*time.Second)
		harness.HoldJobs(t, ns, sj.GetName(), 8, time.Duration(polling+2)*time.Second)
		pub.Purge(t, "reports")
	})
}

// TestPushNeverLost: on each broker, a ScaledObject created while its queue is already non-empty
// reaches 1 replica, and so does every later activation from 0 (five cycles of publish, drain,
// cooldown), each within the broker's push bound of the publish (harness.ExampleBroker.PushBound).
//
// It asserts latencies, so it runs sequentially (no t.Parallel), as TestBrokerOutage does, before
// the parallel scenarios are released: under their load an activation took just over the 1 s
// bound on Redis and RabbitMQ. Its three subtests still run in parallel with each other.
func TestPushNeverLost(t *testing.T) {
	harness.ForEachBroker(t, testPushNeverLost)
}

func testPushNeverLost(t *testing.T, b harness.ExampleBroker, ns string) {
	const cooldown, cycles = 5, 5
	pub := b.Publisher(t)
	secret, deployment, so := b.WorkerExample(t)
	harness.Set(t, so, int64(cooldown), "spec", "cooldownPeriod")
	// Scale-in waits for a poll: 5 s instead of the example's 30 s keeps the five cycles short.
	// Activation does not depend on it (it is pushed).
	harness.Set(t, so, int64(5), "spec", "pollingInterval")
	harness.Apply(t, ns, secret, deployment)
	rw := harness.WatchReplicas(t, ns, deployment.GetName())
	pub.Publish(t, "celery", 1, 0)
	created := time.Now()
	harness.Apply(t, ns, so)
	at, ok := rw.WaitFor(1, 30*time.Second)
	if !ok {
		t.Fatalf("ScaledObject created over a non-empty queue: replicas %d, want 1\n%s", rw.Current().Replicas, harness.Describe(ns, harness.ScaledObjectGVR, so.GetName()))
	}
	t.Logf("created over a non-empty queue: spec.replicas == 1 %s after the ScaledObject was created", at.Sub(created).Round(time.Millisecond))
	var latencies []time.Duration
	for i := 1; i <= cycles; i++ {
		pub.Purge(t, "celery", "priority")
		if _, ok := rw.WaitFor(0, time.Duration(cooldown+40)*time.Second); !ok {
			t.Fatalf("cycle %d: queue empty, replicas %d, want 0", i, rw.Current().Replicas)
		}
		pub.Publish(t, "celery", 1, 0)
		published := time.Now()
		at, ok := rw.WaitFor(1, 30*time.Second)
		if !ok {
			t.Fatalf("cycle %d: one task, replicas %d, want 1\n%s", i, rw.Current().Replicas, harness.Describe(ns, harness.ScaledObjectGVR, so.GetName()))
		}
		latencies = append(latencies, at.Sub(published))
	}
	t.Logf("activations from 0 after the first: %v", latencies)
	for i, l := range latencies {
		if l > b.PushBound {
			t.Errorf("activation %d reached 1 replica %s after publishing, more than %s (the scaler's stream poll on %s plus well under a second for the push)", i+1, l, b.PushBound, b.Name)
		}
	}
	harness.WriteResult(t, b.Name+"_push_never_lost", map[string]any{"activation_ms": harness.MsAll(latencies)})
	pub.Purge(t, "celery", "priority")
}

// TestScaleDownFollowsBehavior: on each broker, the worker example's HPA behavior (scale up at
// once; scale down by at most 2 pods per period after a stabilization window), with the windows
// shortened to 20 s and 15 s: 47 tasks take the Deployment from 1 to 10 in one step; a drained
// queue steps it down by at most 2 pods per 15 s; KEDA takes it to 0 after cooldownPeriod.
func TestScaleDownFollowsBehavior(t *testing.T) {
	t.Parallel()
	harness.ForEachBroker(t, testScaleDownFollowsBehavior)
}

func testScaleDownFollowsBehavior(t *testing.T, b harness.ExampleBroker, ns string) {
	const period = 15
	pub := b.Publisher(t)
	secret, deployment, so := b.WorkerExample(t)
	harness.SetTrigger(t, so, "queueLength", "5")
	harness.Set(t, so, int64(5), "spec", "pollingInterval")
	harness.Set(t, so, int64(150), "spec", "cooldownPeriod")
	behavior, found, _ := unstructured.NestedMap(so.Object, "spec", "advanced", "horizontalPodAutoscalerConfig", "behavior")
	if !found {
		t.Fatalf("%s/worker.yaml has no advanced.horizontalPodAutoscalerConfig.behavior", b.Dir)
	}
	down := behavior["scaleDown"].(map[string]any)
	policies := down["policies"].([]any)
	step, _, err := harness.NestedInt(policies[0].(map[string]any), "value")
	if err != nil {
		t.Fatal(err)
	}
	// Not shorter than the period, as in the example: the HPA counts a period from the replicas at
	// its start, so a scale-up inside the same period would net out against the scale-down limit.
	down["stabilizationWindowSeconds"] = int64(20)
	policies[0].(map[string]any)["periodSeconds"] = int64(period)
	harness.Set(t, so, behavior, "spec", "advanced", "horizontalPodAutoscalerConfig", "behavior")
	// The queue exists and is empty before KEDA reads it: on RabbitMQ and SQS a missing queue is an
	// error, which turns the ScaledObject Ready=False at its first reading (the wait below could
	// only catch the moment before it).
	pub.Publish(t, "celery", 1, 0)
	pub.Purge(t, "celery")
	harness.Apply(t, ns, secret, deployment, so)
	harness.WaitScaledObjectReady(t, ns, so.GetName(), 60*time.Second)
	hpa, err := harness.Kube.Client.AutoscalingV2().HorizontalPodAutoscalers(ns).Get(context.Background(), "keda-hpa-"+so.GetName(), metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if b := hpa.Spec.Behavior; b == nil || b.ScaleDown == nil || len(b.ScaleDown.Policies) != 1 || b.ScaleDown.Policies[0].Value != int32(step) {
		t.Fatalf("KEDA's HPA does not carry the example's scale-down behavior: %+v", hpa.Spec.Behavior)
	}
	rw := harness.WatchReplicas(t, ns, deployment.GetName())

	pub.Publish(t, "celery", 47, 0)
	if _, ok := rw.WaitFor(10, 60*time.Second); !ok {
		t.Fatalf("47 tasks: replicas %d, want 10; %v\n%s", rw.Current().Replicas, rw.Changes(), harness.Describe(ns, harness.ScaledObjectGVR, so.GetName()))
	}
	if h := rw.Changes(); len(h) != 3 || h[1].Replicas != 1 || h[2].Replicas != 10 {
		t.Fatalf("scale-up was not one step from 1 to 10: %v", h)
	}
	drainedFrom := len(rw.Changes())
	b.Worker(t, 4)
	b.WaitDrained(t)
	if _, ok := rw.WaitFor(0, 300*time.Second); !ok {
		t.Fatalf("drained: replicas %d, want 0; %v\n%s", rw.Current().Replicas, rw.Changes(), harness.Describe(ns, harness.ScaledObjectGVR, so.GetName()))
	}
	h := rw.Changes()
	t.Logf("replicas: %v", h)
	// HPA steps: 10 -> 8 -> ... -> 1, each at most `step` pods and a period after the last.
	for i := drainedFrom; i < len(h)-1; i++ {
		prev, cur := h[i-1], h[i]
		if prev.Replicas-cur.Replicas > int32(step) {
			t.Fatalf("step %v -> %v removes more than %d pods: %v", prev, cur, step, h)
		}
		if i > drainedFrom && cur.At.Sub(prev.At) < (period-1)*time.Second {
			t.Fatalf("step %v -> %v came %s after the previous one, within the %d s period: %v", prev, cur, cur.At.Sub(prev.At), period, h)
		}
	}
	if steps := len(h) - 1 - drainedFrom; steps < 4 {
		t.Fatalf("the HPA stepped down %d times, want at least 4 (10 -> 1 by %d): %v", steps, step, h)
	}
}
