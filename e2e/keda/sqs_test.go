package e2e

import (
	"fmt"
	"testing"
	"time"

	"github.com/celery-keda-scaler/e2e/keda/harness"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
)

// builtinSQS is a copy of the example's Deployment scaled by KEDA's own `aws-sqs-queue` scaler on
// the same SQS queue, as a user would set it: the queue URL, the region, the endpoint (moto), and
// the keys through a TriggerAuthentication. Its defaults are kept (scaleOnInFlight true).
func builtinSQS(t testing.TB, s harness.SQS, deployment *unstructured.Unstructured, celeryQueue string, value int, cooldown, polling int64) (objs []*unstructured.Unstructured, dep, so *unstructured.Unstructured) {
	t.Helper()
	keys := &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": "v1", "kind": "Secret",
		"metadata":   map[string]any{"name": "builtin-sqs-keys"},
		"stringData": map[string]any{"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"},
	}}
	auth := &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": "keda.sh/v1alpha1", "kind": "TriggerAuthentication",
		"metadata": map[string]any{"name": "builtin-sqs-keys"},
		"spec": map[string]any{"secretTargetRef": []any{
			map[string]any{"parameter": "awsAccessKeyID", "name": "builtin-sqs-keys", "key": "AWS_ACCESS_KEY_ID"},
			map[string]any{"parameter": "awsSecretAccessKey", "name": "builtin-sqs-keys", "key": "AWS_SECRET_ACCESS_KEY"},
		}},
	}}
	dep = harness.CopyDeployment(t, deployment, "builtin-sqs-worker")
	so = harness.NewScaledObject(dep.GetName(), dep.GetName(), "aws-sqs-queue", polling, cooldown, map[string]any{
		"queueURL": s.QueueURL(celeryQueue), "queueLength": fmt.Sprint(value),
		"awsRegion": "us-east-1", "awsEndpoint": s.Endpoint,
	})
	trigger := so.Object["spec"].(map[string]any)["triggers"].([]any)[0].(map[string]any)
	trigger["authenticationRef"] = map[string]any{"name": auth.GetName()}
	return []*unstructured.Unstructured{keys, auth}, dep, so
}

// TestSQSHPAScalesWithInFlightTasks: 47 long acks_late tasks, a worker with concurrency 2 and
// prefetch multiplier 4 receives some (invisible on SQS until deleted): ours counts visible +
// invisible = 47 -> exactly ceil(47/5) = 10 replicas. KEDA's `aws-sqs-queue` scaler, beside it on
// the same queue, counts invisible messages by default too (scaleOnInFlight): recorded.
func TestSQSHPAScalesWithInFlightTasks(t *testing.T) {
	t.Parallel()
	ns := harness.Namespace(t, harness.NSName(t, ""))
	b := harness.NewExampleBroker(t, "sqs", ns)
	s := b.SQS
	pub := b.Publisher(t)
	secret, deployment, so := b.WorkerExample(t)
	harness.SetTrigger(t, so, "queueLength", "5")
	harness.Set(t, so, int64(5), "spec", "pollingInterval")
	extra, bDep, bSO := builtinSQS(t, s, deployment, "celery", 5, 300, 5)
	pub.Publish(t, "celery", 47, 120) // creates the queue; nothing finishes during the test
	harness.StartWorkerEnv(t, s.Broker, []string{"celery"}, 2, s.Env(), "CKS_ACKS_LATE=1", "CKS_PREFETCH=4")
	harness.Apply(t, ns, append(extra, secret, deployment, so, bDep, bSO)...)
	harness.WaitScaledObjectReady(t, ns, so.GetName(), 60*time.Second)
	harness.WaitScaledObjectReady(t, ns, bSO.GetName(), 60*time.Second)
	ours, builtin := harness.WatchReplicas(t, ns, deployment.GetName()), harness.WatchReplicas(t, ns, bDep.GetName())
	if _, ok := ours.WaitFor(10, 120*time.Second); !ok {
		t.Fatalf("47 tasks (some received by the worker): replicas %d, want 10; %v\n%s", ours.Current().Replicas, ours.Changes(), harness.Describe(ns, harness.ScaledObjectGVR, so.GetName()))
	}
	if _, ok := builtin.WaitFor(10, 120*time.Second); !ok {
		t.Fatalf("KEDA's aws-sqs-queue scaler (scaleOnInFlight true by default): replicas %d, want 10; %v\n%s", builtin.Current().Replicas, builtin.Changes(), harness.Describe(ns, harness.ScaledObjectGVR, bSO.GetName()))
	}
	// The worker holds some of them invisible: what both counted includes in-flight messages.
	inFlight, err := harness.ProbeDepth(s.Broker, "celery", append(s.ProbeArgs(), "scaleOnInFlight=false")...)
	if err != nil || inFlight >= 47 {
		t.Fatalf("visible messages %d (err %v): the worker was expected to hold some in flight", inFlight, err)
	}
	t.Logf("47 tasks, %d visible: ours %v; KEDA's aws-sqs-queue scaler %v", inFlight, ours.Changes(), builtin.Changes())
	harness.WriteResult(t, "sqs_hpa_in_flight", map[string]any{"ours_replicas": 10, "builtin_sqs_replicas": builtin.Current().Replicas, "visible": inFlight})
}

// TestSQSNeverToZeroUnderAcksLateTasks: the README's SQS recipe (`acks_late`): two 45 s tasks run,
// nothing else is queued. Their messages stay invisible until the tasks finish, so ours keeps 1
// replica through 4.5 cooldownPeriods and reaches 0 only after they end. KEDA's `aws-sqs-queue`
// scaler with its defaults (scaleOnInFlight true) reads the same messages: recorded beside it.
func TestSQSNeverToZeroUnderAcksLateTasks(t *testing.T) {
	t.Parallel()
	const cooldown, polling, taskSeconds = 10, 5, 45
	ns := harness.Namespace(t, harness.NSName(t, ""))
	b := harness.NewExampleBroker(t, "sqs", ns)
	s := b.SQS
	pub := b.Publisher(t)
	secret, deployment, so := b.WorkerExample(t)
	harness.Set(t, so, int64(cooldown), "spec", "cooldownPeriod")
	harness.Set(t, so, int64(polling), "spec", "pollingInterval")
	extra, bDep, bSO := builtinSQS(t, s, deployment, "celery", 10, cooldown, polling)
	marker := fmt.Sprintf("cks-e2e-started-%d", time.Now().UnixNano())
	pub.Do(t, map[string]any{"op": "publish", "queue": "celery", "count": 2, "seconds": taskSeconds, "marker": marker})
	harness.Apply(t, ns, append(extra, secret, deployment, so, bDep, bSO)...)
	harness.WaitScaledObjectReady(t, ns, so.GetName(), 60*time.Second)
	harness.WaitScaledObjectReady(t, ns, bSO.GetName(), 60*time.Second)
	ours, builtin := harness.WatchReplicas(t, ns, deployment.GetName()), harness.WatchReplicas(t, ns, bDep.GetName())
	for name, rw := range map[string]*harness.ReplicaWatch{"ours": ours, "KEDA's aws-sqs-queue scaler": builtin} {
		if _, ok := rw.WaitFor(1, 30*time.Second); !ok {
			t.Fatalf("%s: two tasks queued, replicas %d, want 1", name, rw.Current().Replicas)
		}
	}
	markerDB := harness.LeaseRedisDB(t).URL
	markers := harness.NewPublisher(t, markerDB)
	harness.StartWorkerEnv(t, s.Broker, []string{"celery"}, 2, s.Env(), "CKS_ACKS_LATE=1",
		"CKS_MARKER_REDIS="+markerDB)
	markers.WaitStarted(t, marker, 2)
	started := time.Now()
	if visible, err := harness.ProbeDepth(s.Broker, "celery", append(s.ProbeArgs(), "scaleOnInFlight=false")...); err != nil || visible != 0 {
		t.Fatalf("both tasks run: visible messages %d (err %v), want 0", visible, err)
	}
	ended := harness.WaitDepthZeroQueues(t, s.Broker, "celery", s.ProbeArgs()...)
	if ended.Before(started.Add((taskSeconds - 2) * time.Second)) {
		t.Fatalf("the scaler read 0 at %s, before the tasks could finish", ended.Format("15:04:05"))
	}
	exposure := func(rw *harness.ReplicaWatch) float64 {
		for _, c := range rw.Changes() {
			if c.Replicas == 0 && c.At.After(started) && c.At.Before(ended) {
				return ended.Sub(c.At).Seconds()
			}
		}
		return 0
	}
	if e := exposure(ours); e != 0 {
		t.Fatalf("ours went to 0 %.1f s before the tasks ended: %v", e, ours.Changes())
	}
	if _, ok := ours.WaitFor(0, time.Duration(cooldown+3*polling+30)*time.Second); !ok {
		t.Fatalf("tasks done, replicas still %d", ours.Current().Replicas)
	}
	builtinExposed := exposure(builtin)
	t.Logf("tasks ran %s -> %s; ours %v; KEDA's aws-sqs-queue scaler %v, scaled in under running tasks for %.1f s",
		started.Format("15:04:05"), ended.Format("15:04:05"), ours.Changes(), builtin.Changes(), builtinExposed)
	harness.WriteResult(t, "sqs_acks_late_running_tasks", map[string]any{"ours_exposed_s": 0, "builtin_sqs_exposed_s": builtinExposed})
}
