package cluster

import (
	"context"
	"crypto/tls"
	"fmt"
	"net/http"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/celery-keda-scaler/e2e/keda/cluster/process"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
)

// The Kubernetes part of the control plane: etcd, kube-apiserver (RBAC, aggregation for KEDA's
// external metrics API) and kube-controller-manager.

// startKubernetes starts etcd, kube-apiserver and kube-controller-manager, each ready before the next.
func (c *Cluster) startKubernetes(ctx context.Context) error {
	if err := c.startEtcd(ctx); err != nil {
		return err
	}
	if err := c.startAPIServer(ctx); err != nil {
		return err
	}
	return c.startControllerManager(ctx)
}

func (c *Cluster) startEtcd(ctx context.Context) error {
	client, err := process.FreePort()
	if err != nil {
		return err
	}
	peer, err := process.FreePort()
	if err != nil {
		return err
	}
	cu := fmt.Sprintf("http://127.0.0.1:%d", client)
	pu := fmt.Sprintf("http://127.0.0.1:%d", peer)
	p, err := c.start("etcd", nil,
		"--name=cks-e2e", "--data-dir="+c.path("etcd"),
		"--listen-client-urls="+cu, "--advertise-client-urls="+cu,
		"--listen-peer-urls="+pu, "--initial-advertise-peer-urls="+pu,
		"--initial-cluster=cks-e2e="+pu,
		// Test data: no fsync, small quota, quiet logs.
		"--unsafe-no-fsync", "--quota-backend-bytes=1073741824", "--log-level=warn")
	if err != nil {
		return err
	}
	hc := &http.Client{Timeout: 2 * time.Second}
	if err := p.WaitFor(ctx, "health", 60*time.Second, func() error {
		body, err := process.HTTPGet(hc, cu+"/health")
		if err == nil && !strings.Contains(body, `"health":"true"`) {
			err = fmt.Errorf("unhealthy: %s", body)
		}
		return err
	}); err != nil {
		return err
	}
	c.etcdURL = cu
	return nil
}

func (c *Cluster) startAPIServer(ctx context.Context) error {
	port, err := process.FreePort()
	if err != nil {
		return err
	}
	pki := c.path("pki")
	pk := func(name string) string { return filepath.Join(pki, name) }
	p, err := c.start("kube-apiserver", nil,
		"--etcd-servers="+c.etcdURL,
		"--bind-address=127.0.0.1", "--secure-port="+strconv.Itoa(port),
		// Without these the apiserver advertises (and reconciles the `kubernetes` Service's
		// endpoints to) a host interface address.
		"--advertise-address=127.0.0.1", "--endpoint-reconciler-type=none",
		"--tls-cert-file="+pk("apiserver.crt"), "--tls-private-key-file="+pk("apiserver.key"),
		"--client-ca-file="+pk("ca.crt"),
		"--service-cluster-ip-range=10.96.0.0/16",
		"--service-account-issuer=https://kubernetes.default.svc",
		"--service-account-key-file="+pk("sa.pub"), "--service-account-signing-key-file="+pk("sa.key"),
		"--authorization-mode=RBAC",
		// No ServiceAccount controller runs, so no `default` ServiceAccount exists to admit pods with.
		"--disable-admission-plugins=ServiceAccount",
		// Aggregation (KEDA's external metrics API): the front proxy's client certificate and CA.
		"--requestheader-client-ca-file="+pk("front-proxy-ca.crt"),
		"--requestheader-allowed-names=front-proxy-client",
		"--requestheader-username-headers=X-Remote-User",
		"--requestheader-group-headers=X-Remote-Group",
		"--requestheader-extra-headers-prefix=X-Remote-Extra-",
		"--proxy-client-cert-file="+pk("front-proxy-client.crt"), "--proxy-client-key-file="+pk("front-proxy-client.key"),
		"--enable-aggregator-routing=false",
		"--v=1")
	if err != nil {
		return err
	}
	c.apiURL = fmt.Sprintf("https://127.0.0.1:%d", port)
	c.Kubeconfig = c.path("admin.kubeconfig")
	kc := clientcmdapi.NewConfig()
	kc.Clusters["cks-e2e"] = &clientcmdapi.Cluster{Server: c.apiURL, CertificateAuthority: pk("ca.crt")}
	kc.AuthInfos["admin"] = &clientcmdapi.AuthInfo{ClientCertificate: pk("admin.crt"), ClientKey: pk("admin.key")}
	kc.Contexts["cks-e2e"] = &clientcmdapi.Context{Cluster: "cks-e2e", AuthInfo: "admin"}
	kc.CurrentContext = "cks-e2e"
	if err := clientcmd.WriteToFile(*kc, c.Kubeconfig); err != nil {
		return err
	}
	if c.Rest, err = clientcmd.BuildConfigFromFlags("", c.Kubeconfig); err != nil {
		return err
	}
	c.Rest.QPS, c.Rest.Burst = 100, 200
	if c.Client, err = kubernetes.NewForConfig(c.Rest); err != nil {
		return err
	}
	if c.Dynamic, err = dynamic.NewForConfig(c.Rest); err != nil {
		return err
	}
	if err := p.WaitFor(ctx, "/readyz", 120*time.Second, func() error {
		body, err := c.Client.Discovery().RESTClient().Get().AbsPath("/readyz").DoRaw(ctx)
		if err != nil {
			return fmt.Errorf("%v: %s", err, body)
		}
		return nil
	}); err != nil {
		return err
	}
	v, err := c.Client.Discovery().ServerVersion()
	if err != nil {
		return err
	}
	c.cfg.Log("kube-apiserver %s ready at %s", v.GitVersion, c.apiURL)
	return nil
}

func (c *Cluster) startControllerManager(ctx context.Context) error {
	port, err := process.FreePort()
	if err != nil {
		return err
	}
	p, err := c.start("kube-controller-manager", nil,
		"--kubeconfig="+c.Kubeconfig,
		"--authentication-kubeconfig="+c.Kubeconfig, "--authorization-kubeconfig="+c.Kubeconfig,
		"--bind-address=127.0.0.1", "--secure-port="+strconv.Itoa(port),
		"--leader-elect=false",
		"--use-service-account-credentials=false",
		"--controllers=deployment-controller,replicaset-controller,job-controller,horizontal-pod-autoscaler-controller,garbage-collector-controller",
		"--horizontal-pod-autoscaler-sync-period="+c.cfg.HPASyncPeriod.String(),
		"--horizontal-pod-autoscaler-downscale-stabilization="+c.cfg.HPADownscaleStabilization.String(),
		"--root-ca-file="+c.path("pki", "ca.crt"),
		"--v=1")
	if err != nil {
		return err
	}
	hc := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}} //nolint:gosec // loopback health check of a self-signed test server
	return p.WaitFor(ctx, "/healthz", 60*time.Second, func() error {
		_, err := process.HTTPGet(hc, fmt.Sprintf("https://127.0.0.1:%d/healthz", port))
		return err
	})
}
