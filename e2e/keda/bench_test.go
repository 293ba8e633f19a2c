package e2e

import (
	"context"
	"fmt"
	"os"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/celery-keda-scaler/e2e/keda/harness"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
)

// BenchmarkActivation measures publish -> spec.replicas == 1 through the real KEDA,
// CKS_E2E_BENCH_TRIALS times per variant (default 20), a fresh ScaledObject per trial. On one
// Redis queue: our external-push trigger (the worker example), our `external` trigger polled
// every 5 s, and KEDA's built-in `redis` scaler polled every 30 s (KEDA's default) and every 5 s.
// Then our external-push trigger on RabbitMQ and on SQS (each broker's worker example, in a vhost
// or queue prefix of the benchmark's own). CKS_E2E_BENCH_VARIANTS (comma-separated indexes, from
// 0) runs some of them. Run it with:
//
//	bash e2e/scripts/run.sh -run '^$' -bench Activation -benchtime 1x
//
// It reports p50 and p90 in milliseconds per variant and appends them to the results file.
func BenchmarkActivation(b *testing.B) {
	trials := 20
	if v, err := strconv.Atoi(os.Getenv("CKS_E2E_BENCH_TRIALS")); err == nil && v > 0 {
		trials = v
	}
	db := harness.LeaseRedisDB(b)
	broker := db.URL
	variants := []struct {
		name    string
		polling int64
		make    func(ns string, deployment *unstructured.Unstructured) *unstructured.Unstructured
		broker  string // another broker's worker example (make is not used), or "" for Redis
	}{
		{"ours external-push", 30, func(ns string, d *unstructured.Unstructured) *unstructured.Unstructured {
			return harness.NewScaledObject("bench", d.GetName(), "external-push", 30, 300, map[string]any{
				"scalerAddress": harness.Scaler.Addr, "brokerUrlFromEnv": "CELERY_BROKER_URL", "queues": "celery,priority", "queueLength": "10",
			})
		}, ""},
		{"ours external, pollingInterval 5 s", 5, func(ns string, d *unstructured.Unstructured) *unstructured.Unstructured {
			return harness.NewScaledObject("bench", d.GetName(), "external", 5, 300, map[string]any{
				"scalerAddress": harness.Scaler.Addr, "brokerUrlFromEnv": "CELERY_BROKER_URL", "queues": "celery,priority", "queueLength": "10",
			})
		}, ""},
		{"KEDA redis, pollingInterval 30 s", 30, func(ns string, d *unstructured.Unstructured) *unstructured.Unstructured {
			return harness.NewScaledObject("bench", d.GetName(), "redis", 30, 300, builtinRedisMetadata(db, "celery", 10))
		}, ""},
		{"KEDA redis, pollingInterval 5 s", 5, func(ns string, d *unstructured.Unstructured) *unstructured.Unstructured {
			return harness.NewScaledObject("bench", d.GetName(), "redis", 5, 300, builtinRedisMetadata(db, "celery", 10))
		}, ""},
		{name: "ours external-push, RabbitMQ", polling: 30, broker: "rabbitmq"},
		{name: "ours external-push, SQS", polling: 30, broker: "sqs"},
	}
	run := map[int]bool{}
	if v := os.Getenv("CKS_E2E_BENCH_VARIANTS"); v != "" {
		for _, f := range strings.Split(v, ",") {
			i, err := strconv.Atoi(f)
			if err != nil {
				b.Fatalf("CKS_E2E_BENCH_VARIANTS: %v", err)
			}
			run[i] = true
		}
	}
	for n := 0; n < b.N; n++ {
		for vi, v := range variants {
			if len(run) > 0 && !run[vi] {
				continue
			}
			pub := harness.NewPublisher(b, broker)
			example := func() (secret, deployment, so *unstructured.Unstructured) {
				secret, deployment, _ = harness.RedisWorkerExample(b, broker)
				return secret, deployment, nil
			}
			if v.broker != "" {
				eb := harness.NewExampleBroker(b, v.broker, fmt.Sprintf("bench-activation-%d-%s", n, v.broker))
				pub = eb.Publisher(b)
				// The queue exists before the first trial (on RabbitMQ a missing queue is an error).
				pub.Publish(b, "celery", 1, 0)
				example = func() (secret, deployment, so *unstructured.Unstructured) { return eb.WorkerExample(b) }
			}
			var lat []time.Duration
			for i := 1; i <= trials; i++ {
				ns := fmt.Sprintf("bench-activation-%d-%d-%d", n, vi, i)
				harness.Namespace(b, ns)
				pub.Purge(b, "celery", "priority")
				// The previous trial's reading (1 task) answers identical requests for the
				// scaler's result window: the new ScaledObject's first poll must not get it.
				time.Sleep(harness.ScalerResultWindow)
				secret, deployment, so := example()
				if so == nil {
					so = v.make(ns, deployment)
				}
				for _, o := range []*unstructured.Unstructured{secret, deployment, so} {
					if _, err := harness.Kube.Apply(context.Background(), ns, o); err != nil {
						b.Fatal(err)
					}
				}
				harness.WaitScaledObjectReady(b, ns, so.GetName(), 60*time.Second)
				// A random phase against the polls: KEDA polled once at start.
				time.Sleep(time.Duration(i%7) * 700 * time.Millisecond)
				rw := harness.WatchReplicas(b, ns, deployment.GetName())
				if c := rw.Current(); c.Replicas != 0 {
					b.Fatalf("%s trial %d: %d replicas before the task was published\n%s", v.name, i, c.Replicas, harness.Describe(ns, harness.ScaledObjectGVR, so.GetName()))
				}
				pub.Publish(b, "celery", 1, 0)
				published := time.Now()
				at, ok := rw.WaitFor(1, time.Duration(v.polling+30)*time.Second)
				if !ok {
					b.Fatalf("%s trial %d: no replica within %d s\n%s", v.name, i, v.polling+30, harness.Describe(ns, harness.ScaledObjectGVR, so.GetName()))
				}
				lat = append(lat, at.Sub(published))
				rw.Stop()
				_ = harness.Kube.Dynamic.Resource(harness.ScaledObjectGVR).Namespace(ns).Delete(context.Background(), so.GetName(), metav1.DeleteOptions{})
			}
			pub.Purge(b, "celery", "priority")
			sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
			p50, p90 := harness.Percentile(lat, 50), harness.Percentile(lat, 90)
			b.Logf("%-36s n=%d p50=%7.0f ms p90=%7.0f ms max=%7.0f ms", v.name, len(lat), harness.Ms(p50), harness.Ms(p90), harness.Ms(lat[len(lat)-1]))
			b.ReportMetric(harness.Ms(p50), fmt.Sprintf("p50-ms/%d", vi))
			b.ReportMetric(harness.Ms(p90), fmt.Sprintf("p90-ms/%d", vi))
			harness.WriteResult(b, "activation", map[string]any{"variant": v.name, "trials": len(lat), "p50_ms": harness.Ms(p50), "p90_ms": harness.Ms(p90), "max_ms": harness.Ms(lat[len(lat)-1])})
		}
	}
}
