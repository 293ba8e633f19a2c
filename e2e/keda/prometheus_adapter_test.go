package e2e

import (
	"fmt"
	"path/filepath"
	"testing"
	"time"

	"github.com/celery-keda-scaler/e2e/keda/cluster"
	"github.com/celery-keda-scaler/e2e/keda/cluster/process"
	"github.com/celery-keda-scaler/e2e/keda/harness"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
)

// TestHPAWithoutKEDA: deploy/examples/without-keda as a team without KEDA runs it. Two scaler
// processes (deploy/base's two replicas) with the example's environment (its watch list, the
// default broker in a Redis database of the test's) are scraped every second by Prometheus
// (Debian's), on a control plane of the test's own without KEDA, where Prometheus Adapter, with
// the example's rules, is the external metrics API; the example's worker Deployment and HPA are
// applied there, and the real HPA controller scales. 47 tasks published with Celery on the two
// queues over several priorities: the external metric reads exactly 47 (not 94: the two replicas
// are counted once), and the Deployment goes to exactly ceil(47/5) = 10 replicas and stays there;
// purged, it reads 0 and the Deployment goes back to exactly minReplicas (1). A third scaler
// watches a broker that does not answer: its up gauge is 0, it exports no task count, and the
// adapter answers no value for that broker (never 0).
func TestHPAWithoutKEDA(t *testing.T) {
	t.Parallel()
	const dir = "deploy/examples/without-keda"
	const metric, selector = "celery_queue_tasks", "broker=default,queue in (celery,priority)"
	broker := harness.LeaseRedisDB(t).URL
	pub := harness.NewPublisher(t, broker)
	pub.Purge(t, "celery", "priority")

	// The scaler as the example's kustomization runs it: its container's environment, the default
	// broker from the Secret celery-keda-brokers (here the test's database), the watch read every
	// second instead of every 15 s.
	scalerObjs := harness.Kustomize(t, filepath.Join(harness.RepoRoot, dir))
	env := append(harness.ContainerEnv(t, harness.Find(t, scalerObjs, "Deployment")), "CELERY_BROKER_URL="+broker)
	fast := []string{"--watch-interval", "1s"}
	replicas := []*harness.ScalerProcess{
		harness.OwnScaler(t, "scaler-without-keda-1", fast, env...),
		harness.OwnScaler(t, "scaler-without-keda-2", fast, env...),
	}
	deadPort, err := process.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	broken := harness.OwnScaler(t, "scaler-without-keda-broken", append([]string{"--watch", "broken:celery"}, fast...),
		fmt.Sprintf("CELERY_KEDA_BROKER_BROKEN=redis://127.0.0.1:%d/0", deadPort))

	kube := harness.StartClusterWithoutKeda(t)
	rules := harness.Find(t, harness.ReadExample(t, dir+"/adapter-rules.yaml"), "ConfigMap")
	config, _, _ := unstructured.NestedString(rules.Object, "data", "config.yaml")
	if config == "" {
		t.Fatalf("%s/adapter-rules.yaml has no data.config.yaml", dir)
	}
	promURL := harness.StartPrometheusAdapter(t, kube, []string{replicas[0].Admin, replicas[1].Admin, broken.Admin}, config)
	harness.ApplyOn(t, kube, cluster.PrometheusAdapterNamespace, rules)
	harness.NamespaceOn(t, kube, "keda")
	harness.ApplyOn(t, kube, "keda", scalerObjs...)

	ns := harness.NamespaceOn(t, kube, harness.NSName(t, ""))
	worker := harness.ReadExample(t, dir+"/worker.yaml")
	secret, deployment, hpa := harness.Find(t, worker, "Secret"), harness.Find(t, worker, "Deployment"), harness.Find(t, worker, "HorizontalPodAutoscaler")
	harness.Set(t, secret, broker, "stringData", "url")
	harness.SetImage(t, deployment)
	harness.ApplyOn(t, kube, ns, secret, deployment, hpa)
	rw := harness.WatchReplicasOn(t, kube, ns, deployment.GetName())

	// Empty queues read 0 (a value, not an absent one), and the Deployment stays at minReplicas.
	harness.WaitExternalMetric(t, kube, ns, metric, selector, 0, 90*time.Second)
	harness.WaitHPAExternalAverage(t, kube, ns, hpa.GetName(), "0", 60*time.Second)
	if c := rw.Current(); c.Replicas != 1 {
		t.Fatalf("%d replicas with empty queues, want minReplicas 1: %v\n%s", c.Replicas, rw.Changes(), harness.DescribeWithoutKeda(kube, ns))
	}

	// 47 tasks, no worker: 20 on celery, 27 on priority, over several priorities (kombu puts each
	// priority step of a queue in a Redis list of its own).
	published := 0
	for _, p := range []struct {
		queue           string
		priority, count int
	}{{"celery", 0, 8}, {"celery", 5, 6}, {"celery", 9, 6}, {"priority", 0, 10}, {"priority", 3, 9}, {"priority", 8, 8}} {
		pub.PublishPriority(t, p.queue, p.count, p.priority)
		published += p.count
	}
	if published != 47 {
		t.Fatalf("published %d tasks, the scenario wants 47", published)
	}
	for _, s := range replicas {
		s.WaitSum(t, "celery_keda_watched_queue_tasks", map[string]string{"broker": "default"}, 47)
	}
	harness.WaitExternalMetric(t, kube, ns, metric, selector, 47, 60*time.Second)
	if _, ok := rw.WaitFor(10, 90*time.Second); !ok {
		t.Fatalf("47 tasks at 5 per replica: %d replicas after 90s, want 10: %v\n%s", rw.Current().Replicas, rw.Changes(), harness.DescribeWithoutKeda(kube, ns))
	}
	// 47 / 10 replicas: the HPA sees the same 47 and keeps 10 for three of its syncs (5 s).
	harness.WaitHPAExternalAverage(t, kube, ns, hpa.GetName(), "4700m", 30*time.Second)
	harness.HoldReplicas(t, rw, 10, 15*time.Second)
	for _, c := range rw.Changes() {
		if c.Replicas != 1 && c.Replicas != 10 {
			t.Fatalf("the Deployment went through %d replicas: %v (want 1, then exactly 10)", c.Replicas, rw.Changes())
		}
	}
	t.Logf("47 tasks: external metric 47, replicas %v", rw.Changes())

	// A broker that does not answer: up 0, no task count in the scaler or in Prometheus, and no
	// value from the adapter.
	broken.WaitSum(t, "celery_keda_watched_queue_up", map[string]string{"broker": "broken", "queue": "celery"}, 0)
	if got, err := broken.Samples("celery_keda_watched_queue_tasks", nil); err != nil || len(got) != 0 {
		t.Fatalf("the scaler watching a dead broker exports task counts %v (err %v), want none", got, err)
	}
	harness.WaitPromQuery(t, promURL, `celery_keda_watched_queue_up{broker="broken"}`, map[string]string{
		"__name__=celery_keda_watched_queue_up,broker=broken,instance=" + broken.Admin + ",job=celery-keda-scaler,queue=celery": "0",
	})
	if got, err := harness.PromQuery(promURL, `celery_keda_watched_queue_tasks{broker="broken"}`); err != nil || len(got) != 0 {
		t.Fatalf("Prometheus has task counts %v of the dead broker (err %v), want none", got, err)
	}
	if got, err := harness.ExternalMetric(kube, ns, metric, "broker=broken,queue=celery"); err != nil || len(got) != 0 {
		t.Fatalf("the adapter answers %v for the dead broker (err %v), want no value", got, err)
	}

	// Purged: 0, and back to exactly minReplicas after the downscale stabilisation (15 s here).
	pub.Purge(t, "celery", "priority")
	harness.WaitExternalMetric(t, kube, ns, metric, selector, 0, 60*time.Second)
	if _, ok := rw.WaitFor(1, 120*time.Second); !ok {
		t.Fatalf("queues purged: %d replicas after 120s, want minReplicas 1: %v\n%s", rw.Current().Replicas, rw.Changes(), harness.DescribeWithoutKeda(kube, ns))
	}
	harness.HoldReplicas(t, rw, 1, 10*time.Second)
	t.Logf("purged: replicas %v", rw.Changes())
}
