// Command cluster starts the end-to-end suite's control plane and KEDA by hand, for debugging a
// scenario with kubectl: it prints the kubeconfig path and runs until interrupted.
//
//	cd e2e/keda && go run ./cmd/cluster -bin "$(bash ../scripts/build.sh)" -dir /tmp/cks-cluster
//	KUBECONFIG=/tmp/cks-cluster/admin.kubeconfig kubectl get scaledobjects -A
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/celery-keda-scaler/e2e/keda/cluster"
)

func main() {
	bin := flag.String("bin", os.Getenv("CKS_E2E_BIN"), "directory with the control plane's binaries (e2e/scripts/build.sh prints it)")
	dir := flag.String("dir", "", "work directory (certificates, kubeconfig, etcd data, logs); default: a new temporary directory")
	noKeda := flag.Bool("no-keda", false, "start etcd, kube-apiserver and kube-controller-manager only")
	flag.Parse()
	if *bin == "" {
		fmt.Fprintln(os.Stderr, "cluster: -bin (or CKS_E2E_BIN) is required: bash e2e/scripts/build.sh prints it")
		os.Exit(2)
	}
	if *dir == "" {
		d, err := os.MkdirTemp("", "cks-cluster-")
		if err != nil {
			fmt.Fprintln(os.Stderr, "cluster:", err)
			os.Exit(1)
		}
		*dir = d
	}
	kedaDir, err := exec.Command("go", "list", "-m", "-f", "{{.Dir}}", "github.com/kedacore/keda/v2").Output()
	if err != nil {
		fmt.Fprintln(os.Stderr, "cluster: go list -m github.com/kedacore/keda/v2:", err)
		os.Exit(1)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	c, err := cluster.Start(ctx, cluster.Config{
		BinDir:  *bin,
		KedaDir: strings.TrimSpace(string(kedaDir)),
		WorkDir: *dir,
		NoKeda:  *noKeda,
		Log: func(format string, args ...any) {
			fmt.Fprintf(os.Stderr, "%s %s\n", time.Now().Format("15:04:05.000"), fmt.Sprintf(format, args...))
		},
	})
	if err != nil {
		fmt.Fprintln(os.Stderr, "cluster:", err)
		os.Exit(1)
	}
	defer c.Stop()
	fmt.Printf("export KUBECONFIG=%s\n", c.Kubeconfig)
	<-ctx.Done()
}
