// Package harness is what the end-to-end scenarios (package e2e, the *_test.go files beside it)
// are written with: the suite's shared state set up once by Main (the control plane and KEDA from
// package cluster, one scaler process, the brokers' addresses), scaler processes of a test's own,
// Celery publishers and workers, namespaces and objects applied from deploy/, watches and waits on
// what KEDA and the HPA do, and each test's place on the shared brokers: a Redis database leased
// from a pool (a lock file per database, so two runs on one machine never share one), a RabbitMQ
// vhost and an SQS queue-name prefix unique to the test and the run.
//
// Everything here is safe for tests that run in parallel (t.Parallel): shared state is written
// only by Main, before any test runs.
package harness

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/celery-keda-scaler/e2e/keda/cluster"
	"k8s.io/apimachinery/pkg/runtime/schema"
)

// The suite's shared state, set by Main before any test runs and read-only afterwards.
var (
	// Kube is the control plane with KEDA.
	Kube *cluster.Cluster
	// Scaler is the suite's scaler process, which the scenarios' triggers call unless a test
	// starts a scaler of its own.
	Scaler *ScalerProcess
	// RepoRoot is the repository's root directory.
	RepoRoot string
	// WorkDir holds the control plane's files and every process's log (WorkDir/logs).
	WorkDir string
	// RedisURL is the base URL of the suite's Redis, without a database.
	RedisURL string
	// Python is the Celery virtualenv's interpreter.
	Python string
	// RunID tells this run's names on shared brokers (vhosts, SQS prefixes) from another run's.
	RunID string
)

// ScalerResultWindow is the suite's scaler's --result-window (its default, set explicitly).
const ScalerResultWindow = 250 * time.Millisecond

var (
	// ScaledObjectGVR is KEDA's ScaledObject resource.
	ScaledObjectGVR = schema.GroupVersionResource{Group: "keda.sh", Version: "v1alpha1", Resource: "scaledobjects"}
	// ScaledJobGVR is KEDA's ScaledJob resource.
	ScaledJobGVR = schema.GroupVersionResource{Group: "keda.sh", Version: "v1alpha1", Resource: "scaledjobs"}
)

// Logf prints one timestamped line of the harness to stderr.
func Logf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "e2e: %s %s\n", time.Now().Format("15:04:05.000"), fmt.Sprintf(format, args...))
}

// Main is the suite's TestMain: it starts the control plane and KEDA, then the suite's scaler, runs
// the tests and returns their exit code. Nothing here skips: a missing piece fails the run with
// what to do about it.
func Main(m *testing.M) int {
	need := map[string]string{}
	for _, k := range []string{"CKS_E2E_BIN", "CKS_SCALER_BIN", "CKS_REDIS_URL", "CKS_PYTHON"} {
		need[k] = os.Getenv(k)
		if need[k] == "" {
			fmt.Fprintf(os.Stderr, "e2e: %s is not set: run the suite with `bash e2e/scripts/run.sh` (or the project's test command, scripts/test.sh), which builds and starts everything it needs\n", k)
			return 1
		}
	}
	RedisURL, Python = strings.TrimRight(need["CKS_REDIS_URL"], "/"), need["CKS_PYTHON"]
	if _, err := redisDBPool(); err != nil {
		fmt.Fprintln(os.Stderr, "e2e:", err)
		return 1
	}
	wd, _ := os.Getwd()
	RepoRoot = filepath.Clean(filepath.Join(wd, "..", ".."))
	b := make([]byte, 4)
	_, _ = rand.Read(b)
	RunID = hex.EncodeToString(b)

	var err error
	WorkDir = os.Getenv("CKS_E2E_WORKDIR")
	if WorkDir == "" {
		if WorkDir, err = os.MkdirTemp("", "cks-e2e-"); err != nil {
			fmt.Fprintln(os.Stderr, "e2e:", err)
			return 1
		}
	}
	kedaDir, err := exec.Command("go", "list", "-m", "-f", "{{.Dir}}", "github.com/kedacore/keda/v2").Output()
	if err != nil {
		fmt.Fprintln(os.Stderr, "e2e: cannot find the KEDA module (go list -m github.com/kedacore/keda/v2):", err)
		return 1
	}
	ctx := context.Background()
	start := time.Now()
	Kube, err = cluster.Start(ctx, cluster.Config{
		BinDir:                    need["CKS_E2E_BIN"],
		KedaDir:                   strings.TrimSpace(string(kedaDir)),
		WorkDir:                   WorkDir,
		HPASyncPeriod:             5 * time.Second,
		HPADownscaleStabilization: 30 * time.Second,
		Log:                       Logf,
	})
	if err != nil {
		fmt.Fprintf(os.Stderr, "e2e: control plane did not start: %v\n(logs in %s)\n", err, WorkDir)
		return 1
	}
	defer Kube.Stop()
	Logf("Control plane and KEDA ready in %s (work dir %s, run %s)", time.Since(start).Round(time.Millisecond), WorkDir, RunID)

	Scaler, err = StartScaler("scaler", []string{"--result-window", ScalerResultWindow.String()})
	if err != nil {
		fmt.Fprintln(os.Stderr, "e2e:", err)
		return 1
	}
	defer Scaler.Stop()

	code := m.Run()
	if code != 0 || os.Getenv("CKS_E2E_KEEP") != "" {
		fmt.Fprintf(os.Stderr, "e2e: logs of every process are in %s/logs\n", WorkDir)
	} else if os.Getenv("CKS_E2E_WORKDIR") == "" {
		Kube.Stop()
		Scaler.Stop()
		_ = os.RemoveAll(WorkDir)
	}
	return code
}
