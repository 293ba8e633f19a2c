package e2e

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/exec"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/celery-keda-scaler/e2e/keda/cluster"
	"github.com/celery-keda-scaler/e2e/keda/harness"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
)

// BenchmarkFleet: a fleet of ScaledObjects on one KEDA operator, 100 distinct queue sets with 10
// ScaledObjects each (CKS_E2E_FLEET_SETS, CKS_E2E_FLEET_PER_SET), all on a redis-server of the
// benchmark's own. The variants, one after the other: our trigger (the Redis worker example:
// external-push on `fleet-<i>,fleet-<i>.high`) served by a scaler process of the benchmark's own,
// first as it runs by default (idle sets armed with Redis CLIENT TRACKING) and then with
// `--redis-client-tracking=false` (the polling a broker that refuses tracking gets); then KEDA's
// built-in `redis` scaler (listName `fleet-<i>`) at the example's pollingInterval (30 s, KEDA's
// default) and at 5 s. Each fleet is measured for CKS_E2E_FLEET_SECONDS (default 60) idle (every
// queue empty, every Deployment at 0); then the activation inside the idle fleet,
// CKS_E2E_FLEET_TRIALS times (default 10): one task published to one set (a different one each
// time), timed until its Deployment has 1 replica; then CKS_E2E_FLEET_SECONDS active (5 tasks
// in every set, every Deployment at 1 replica, so the HPAs read metrics). CKS_E2E_FLEET_VARIANTS
// (comma-separated: ours, ours-polling, builtin, builtin5) runs some of them. Run it with:
//
//	bash e2e/scripts/run.sh -run '^$' -bench Fleet -benchtime 1x -timeout 120m
//
// It reports the scaler's and the operator's CPU and RSS, the broker's commands per second and
// CPU, the TCP connections KEDA holds to the scaler and the activation p50/p90, and appends them
// to the results file. CKS_E2E_FLEET_PER_SET=1 compares the variants at 100 ScaledObjects in
// about 15 minutes.
func BenchmarkFleet(b *testing.B) {
	sets, perSet := envInt("CKS_E2E_FLEET_SETS", 100), envInt("CKS_E2E_FLEET_PER_SET", 10)
	trials := envInt("CKS_E2E_FLEET_TRIALS", 10)
	if trials > sets {
		trials = sets
	}
	window := time.Duration(envInt("CKS_E2E_FLEET_SECONDS", 60)) * time.Second
	r := &harness.OwnRedis{}
	r.Start(b)
	b.Cleanup(func() { r.Stop(b) })
	broker := fmt.Sprintf("redis://127.0.0.1:%d/0", r.Port)
	scalers := map[string]*harness.ScalerProcess{}
	for name, args := range map[string][]string{"ours": nil, "ours-polling": {"--redis-client-tracking=false"}} {
		s, err := harness.StartScaler("scaler-fleet-"+name, args)
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(s.Stop)
		scalers[name] = s
	}
	variants := []string{"ours", "ours-polling", "builtin", "builtin5"}
	if v := os.Getenv("CKS_E2E_FLEET_VARIANTS"); v != "" {
		variants = strings.Split(v, ",")
	}
	pub := harness.NewPublisher(b, broker)
	for n := 0; n < b.N; n++ {
		for _, variant := range variants {
			s := scalers[variant]
			if s == nil {
				s = scalers["ours"] // measured for its CPU only; the builtin variants do not call it
			}
			namespaces := createFleet(b, fmt.Sprintf("fleet-%d-%s", n, variant), variant, s.Addr, broker, r.Port, sets, perSet)
			idle := measureFleet(b, variant+" idle", s, r.Port, window)
			lat := fleetActivation(b, pub, namespaces[0], trials)
			for i := 0; i < sets; i++ {
				pub.Publish(b, fmt.Sprintf("fleet-%d", i), 5, 0)
			}
			waitFleetReplicas(b, namespaces, sets*perSet, 1, 5*time.Minute)
			active := measureFleet(b, variant+" active", s, r.Port, window)
			p50, p90 := harness.Percentile(lat, 50), harness.Percentile(lat, 90)
			b.Logf("%s: activation inside the idle fleet, %d trials: p50 %.0f ms, p90 %.0f ms, max %.0f ms", variant, len(lat), harness.Ms(p50), harness.Ms(p90), harness.Ms(lat[len(lat)-1]))
			for _, m := range []fleetFigures{idle, active} {
				b.Logf("%s: %s", m.name, m)
				harness.WriteResult(b, "fleet", map[string]any{
					"variant": m.name, "scaled_objects": sets * perSet, "queue_sets": sets,
					"scaler_cpu_pct": m.scalerCPU, "scaler_rss_kib": m.scalerRSS, "operator_cpu_pct": m.operatorCPU,
					"operator_rss_kib": m.operatorRSS, "broker_commands_per_s": m.commandsPerSecond, "broker_cpu_pct": m.brokerCPU,
					"grpc_connections": m.connections,
				})
			}
			harness.WriteResult(b, "fleet-activation", map[string]any{
				"variant": variant, "scaled_objects": sets * perSet, "queue_sets": sets, "trials": len(lat),
				"p50_ms": harness.Ms(p50), "p90_ms": harness.Ms(p90), "max_ms": harness.Ms(lat[len(lat)-1]),
			})
			deleteFleet(b, namespaces)
			for i := 0; i < sets; i++ {
				pub.Purge(b, fmt.Sprintf("fleet-%d", i), fmt.Sprintf("fleet-%d.high", i))
			}
		}
	}
}

// fleetActivation publishes one task to each of the first `trials` sets in turn, each time
// timing how long until that set's Deployment in ns has 1 replica; sorted.
func fleetActivation(b testing.TB, pub *harness.Publisher, ns string, trials int) []time.Duration {
	b.Helper()
	var lat []time.Duration
	for i := 0; i < trials; i++ {
		name := fmt.Sprintf("w-%d", i)
		rw := harness.WatchReplicas(b, ns, name)
		if c := rw.Current(); c.Replicas != 0 {
			b.Fatalf("%s/%s: %d replicas before the task was published", ns, name, c.Replicas)
		}
		pub.Publish(b, fmt.Sprintf("fleet-%d", i), 1, 0)
		published := time.Now()
		at, ok := rw.WaitFor(1, 90*time.Second)
		if !ok {
			b.Fatalf("%s/%s: no replica within 90 s of the publish", ns, name)
		}
		lat = append(lat, at.Sub(published))
		rw.Stop()
		// A random phase against the polls of the next trial.
		time.Sleep(time.Duration(i%7) * 700 * time.Millisecond)
	}
	sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
	return lat
}

func envInt(name string, def int) int {
	if v, err := strconv.Atoi(os.Getenv(name)); err == nil && v > 0 {
		return v
	}
	return def
}

// createFleet creates perSet namespaces, each with the worker example's Secret and one Deployment
// and ScaledObject per queue set, and waits until every ScaledObject is Ready.
func createFleet(b testing.TB, prefix, variant, scalerAddr, broker string, redisPort, sets, perSet int) []string {
	b.Helper()
	start := time.Now()
	objs := harness.ReadExample(b, "deploy/examples/redis/worker.yaml")
	secret, deployment, so := harness.Find(b, objs, "Secret"), harness.Find(b, objs, "Deployment"), harness.Find(b, objs, "ScaledObject")
	harness.Set(b, secret, broker, "stringData", "url")
	harness.SetImage(b, deployment)
	harness.SetTrigger(b, so, "scalerAddress", scalerAddr)
	var namespaces []string
	for k := 0; k < perSet; k++ {
		ns := harness.Namespace(b, fmt.Sprintf("%s-%d", prefix, k))
		namespaces = append(namespaces, ns)
		harness.Apply(b, ns, secret)
		for i := 0; i < sets; i++ {
			name := fmt.Sprintf("w-%d", i)
			dep := harness.CopyDeployment(b, deployment, name)
			var o *unstructured.Unstructured
			if strings.HasPrefix(variant, "ours") {
				o = so.DeepCopy()
				o.SetName(name)
				harness.Set(b, o, name, "spec", "scaleTargetRef", "name")
				harness.SetTrigger(b, o, "queues", fmt.Sprintf("fleet-%d,fleet-%d.high", i, i))
			} else {
				md := builtinRedisMetadata(harness.RedisDB{}, fmt.Sprintf("fleet-%d", i), 10)
				md["address"], md["databaseIndex"] = fmt.Sprintf("127.0.0.1:%d", redisPort), "0"
				polling := int64(30)
				if variant == "builtin5" {
					polling = 5
				}
				o = harness.NewScaledObject(name, name, "redis", polling, 300, md)
			}
			harness.Apply(b, ns, dep, o)
		}
	}
	waitFleetReady(b, namespaces, sets*perSet)
	harness.Logf("Fleet %s: %d ScaledObjects Ready in %s", prefix, sets*perSet, time.Since(start).Round(time.Second))
	return namespaces
}

// waitFleetReady waits (up to 30 min) until want ScaledObjects in namespaces are Ready.
func waitFleetReady(b testing.TB, namespaces []string, want int) {
	b.Helper()
	// KEDA's operator reconciles about 2 ScaledObjects a second here (its default client rate
	// limit, --kube-api-qps 20, with some ten API calls per new ScaledObject): 1,000 take ~9 min.
	deadline := time.Now().Add(30 * time.Minute)
	for {
		ready := 0
		for _, ns := range namespaces {
			list, err := harness.Kube.Dynamic.Resource(harness.ScaledObjectGVR).Namespace(ns).List(context.Background(), metav1.ListOptions{})
			if err != nil {
				b.Fatal(err)
			}
			for i := range list.Items {
				if c := cluster.FindCondition(&list.Items[i], "Ready"); c != nil && c["status"] == "True" {
					ready++
				}
			}
		}
		if ready == want {
			break
		}
		if time.Now().After(deadline) {
			b.Fatalf("%d of %d ScaledObjects Ready after 30 min", ready, want)
		}
		time.Sleep(2 * time.Second)
	}
}

// waitFleetReplicas waits until want Deployments in namespaces have exactly replicas.
func waitFleetReplicas(b testing.TB, namespaces []string, want int, replicas int32, timeout time.Duration) {
	b.Helper()
	deadline := time.Now().Add(timeout)
	for {
		n := 0
		for _, ns := range namespaces {
			list, err := harness.Kube.Client.AppsV1().Deployments(ns).List(context.Background(), metav1.ListOptions{})
			if err != nil {
				b.Fatal(err)
			}
			for _, d := range list.Items {
				if d.Spec.Replicas != nil && *d.Spec.Replicas == replicas {
					n++
				}
			}
		}
		if n == want {
			return
		}
		if time.Now().After(deadline) {
			b.Fatalf("%d of %d Deployments at %d replicas after %s", n, want, replicas, timeout)
		}
		time.Sleep(2 * time.Second)
	}
}

// deleteFleet deletes the ScaledObjects (their HPAs go with them) and Deployments of namespaces.
func deleteFleet(b testing.TB, namespaces []string) {
	b.Helper()
	ctx := context.Background()
	for _, ns := range namespaces {
		if err := harness.Kube.Dynamic.Resource(harness.ScaledObjectGVR).Namespace(ns).DeleteCollection(ctx, metav1.DeleteOptions{}, metav1.ListOptions{}); err != nil {
			b.Fatal(err)
		}
		if err := harness.Kube.Client.AppsV1().Deployments(ns).DeleteCollection(ctx, metav1.DeleteOptions{}, metav1.ListOptions{}); err != nil {
			b.Fatal(err)
		}
	}
}

type fleetFigures struct {
	name                   string
	scalerCPU, operatorCPU float64 // percent of one core
	scalerRSS, operatorRSS int64   // KiB at the end of the window
	commandsPerSecond      float64
	brokerCPU              float64 // redis-server, percent of one core
	connections            int     // established TCP connections to the scaler's gRPC port
}

func (f fleetFigures) String() string {
	return fmt.Sprintf("scaler CPU %.1f%% RSS %d KiB; operator CPU %.1f%% RSS %d KiB; broker %.0f commands/s, redis-server CPU %.1f%%; %d gRPC connections",
		f.scalerCPU, f.scalerRSS, f.operatorCPU, f.operatorRSS, f.commandsPerSecond, f.brokerCPU, f.connections)
}

// measureFleet samples CPU time (/proc/<pid>/stat), the broker's total_commands_processed and the
// connections at the start and end of window.
func measureFleet(b testing.TB, name string, s *harness.ScalerProcess, redisPort int, window time.Duration) fleetFigures {
	b.Helper()
	scalerPid, operatorPid, redisPid := s.Pid(), harness.Kube.Pid("operator"), int(redisInfo(b, redisPort, "server", "process_id"))
	cpu0s, cpu0o, cpu0r, cmd0 := cpuTicks(b, scalerPid), cpuTicks(b, operatorPid), cpuTicks(b, redisPid), redisInfo(b, redisPort, "stats", "total_commands_processed")
	t0 := time.Now()
	time.Sleep(window)
	cpu1s, cpu1o, cpu1r, cmd1 := cpuTicks(b, scalerPid), cpuTicks(b, operatorPid), cpuTicks(b, redisPid), redisInfo(b, redisPort, "stats", "total_commands_processed")
	secs := time.Since(t0).Seconds()
	port, _ := strconv.Atoi(s.Addr[strings.LastIndex(s.Addr, ":")+1:])
	return fleetFigures{
		name:              name,
		scalerCPU:         float64(cpu1s-cpu0s) / clockTicks / secs * 100,
		operatorCPU:       float64(cpu1o-cpu0o) / clockTicks / secs * 100,
		scalerRSS:         rssKiB(b, scalerPid),
		operatorRSS:       rssKiB(b, operatorPid),
		commandsPerSecond: float64(cmd1-cmd0) / secs,
		brokerCPU:         float64(cpu1r-cpu0r) / clockTicks / secs * 100,
		connections:       establishedTo(b, port),
	}
}

// clockTicks is USER_HZ, the unit of /proc/<pid>/stat's CPU times (100 on Linux).
const clockTicks = 100

// cpuTicks is utime + stime of a process.
func cpuTicks(b testing.TB, pid int) int64 {
	b.Helper()
	raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		b.Fatal(err)
	}
	// The command name is in parentheses and may hold spaces: fields start after the last ')'.
	fields := strings.Fields(string(raw[strings.LastIndexByte(string(raw), ')')+2:]))
	utime, _ := strconv.ParseInt(fields[11], 10, 64)
	stime, _ := strconv.ParseInt(fields[12], 10, 64)
	return utime + stime
}

func rssKiB(b testing.TB, pid int) int64 {
	b.Helper()
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if rest, ok := strings.CutPrefix(sc.Text(), "VmRSS:"); ok {
			v, _ := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(rest), " kB"), 10, 64)
			return v
		}
	}
	return 0
}

// redisInfo is one integer field of a redis-server's INFO section: `process_id` of "server",
// `total_commands_processed` of "stats".
func redisInfo(b testing.TB, port int, section, field string) int64 {
	b.Helper()
	out, err := exec.Command("redis-cli", "-p", strconv.Itoa(port), "info", section).Output()
	if err != nil {
		b.Fatal(err)
	}
	for _, line := range strings.Split(string(out), "\n") {
		if v, ok := strings.CutPrefix(strings.TrimSpace(line), field+":"); ok {
			n, _ := strconv.ParseInt(v, 10, 64)
			return n
		}
	}
	b.Fatalf("no %s in INFO %s: %s", field, section, out)
	return 0
}

// establishedTo counts established TCP connections whose local port is port (the server side of
// every connection to it), from /proc/net/tcp and tcp6.
func establishedTo(b testing.TB, port int) int {
	b.Helper()
	n := 0
	for _, file := range []string{"/proc/net/tcp", "/proc/net/tcp6"} {
		raw, err := os.ReadFile(file)
		if err != nil {
			continue
		}
		for _, line := range strings.Split(string(raw), "\n")[1:] {
			f := strings.Fields(line)
			if len(f) < 4 || f[3] != "01" {
				continue
			}
			local := f[1]
			p, err := strconv.ParseInt(local[strings.LastIndexByte(local, ':')+1:], 16, 32)
			if err == nil && int(p) == port {
				n++
			}
		}
	}
	return n
}
