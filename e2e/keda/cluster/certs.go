package cluster

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"time"
)

// CA is a certificate authority that signs the control plane's certificates.
type CA struct {
	Cert    *x509.Certificate
	Key     *ecdsa.PrivateKey
	CertPEM []byte
}

// NewCA creates a self-signed CA valid for a day (a test run is much shorter).
func NewCA(name string) (*CA, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial(),
		Subject:               pkix.Name{CommonName: name},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, err
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	return &CA{Cert: cert, Key: key, CertPEM: pemBlock("CERTIFICATE", der)}, nil
}

// Leaf is a certificate and key in PEM.
type Leaf struct {
	CertPEM []byte
	KeyPEM  []byte
}

// Issue signs a leaf certificate for both server and client use. Names that parse as IP
// addresses become IP SANs, the others DNS SANs.
func (ca *CA) Issue(commonName string, orgs []string, names ...string) (*Leaf, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial(),
		Subject:      pkix.Name{CommonName: commonName, Organization: orgs},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
	}
	for _, n := range names {
		if ip := net.ParseIP(n); ip != nil {
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
		} else {
			tmpl.DNSNames = append(tmpl.DNSNames, n)
		}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Cert, &key.PublicKey, ca.Key)
	if err != nil {
		return nil, err
	}
	keyDER, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return nil, err
	}
	return &Leaf{CertPEM: pemBlock("CERTIFICATE", der), KeyPEM: pemBlock("EC PRIVATE KEY", keyDER)}, nil
}

// Write stores the leaf as <dir>/<certName> and <dir>/<keyName>.
func (l *Leaf) Write(dir, certName, keyName string) error {
	if err := writeFile(dir, certName, l.CertPEM); err != nil {
		return err
	}
	return writeFile(dir, keyName, l.KeyPEM)
}

func (c *Cluster) writeCerts() error {
	ca, err := NewCA("cks-e2e-ca")
	if err != nil {
		return err
	}
	c.CA = ca
	front, err := NewCA("cks-e2e-front-proxy-ca")
	if err != nil {
		return err
	}
	pki := c.path("pki")
	if err := os.WriteFile(filepath.Join(pki, "ca.crt"), ca.CertPEM, 0o600); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(pki, "front-proxy-ca.crt"), front.CertPEM, 0o600); err != nil {
		return err
	}
	type leaf struct {
		ca         *CA
		cn         string
		orgs       []string
		names      []string
		dir        string
		cert, key  string
		alsoCACopy bool
	}
	leaves := []leaf{
		{ca, "kube-apiserver", nil, []string{"127.0.0.1", "localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc"}, pki, "apiserver.crt", "apiserver.key", false},
		// Member of system:masters: needs no RBAC objects.
		{ca, "cks-e2e-admin", []string{"system:masters"}, nil, pki, "admin.crt", "admin.key", false},
		{front, "front-proxy-client", nil, nil, pki, "front-proxy-client.crt", "front-proxy-client.key", false},
		// KEDA's operator (gRPC server) and metrics apiserver (its client, and the aggregated
		// API's serving certificate) trust ca.crt of their cert dir and present tls.crt.
		{ca, "keda-operator", nil, []string{"127.0.0.1", "localhost"}, c.path("keda-certs"), "tls.crt", "tls.key", true},
	}
	for _, l := range leaves {
		cert, err := l.ca.Issue(l.cn, l.orgs, l.names...)
		if err != nil {
			return err
		}
		if err := cert.Write(l.dir, l.cert, l.key); err != nil {
			return err
		}
		if l.alsoCACopy {
			if err := writeFile(l.dir, "ca.crt", ca.CertPEM); err != nil {
				return err
			}
		}
	}
	// KEDA's metrics apiserver serves the external metrics API (apiservice.go).
	if err := c.servingCert(c.path("adapter-certs"), c.KedaNamespace, "keda-metrics-apiserver"); err != nil {
		return err
	}
	_, _, err = serviceAccountKey(pki)
	return err
}

// serviceAccountKey writes the key pair the apiserver signs and verifies service-account tokens with.
func serviceAccountKey(dir string) (pub, priv string, err error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return "", "", err
	}
	keyDER, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return "", "", err
	}
	pubDER, err := x509.MarshalPKIXPublicKey(&key.PublicKey)
	if err != nil {
		return "", "", err
	}
	priv, pub = filepath.Join(dir, "sa.key"), filepath.Join(dir, "sa.pub")
	if err := os.WriteFile(priv, pemBlock("EC PRIVATE KEY", keyDER), 0o600); err != nil {
		return "", "", err
	}
	if err := os.WriteFile(pub, pemBlock("PUBLIC KEY", pubDER), 0o600); err != nil {
		return "", "", err
	}
	return pub, priv, nil
}

// writeFile writes a file of the work directory, readable by this user only.
func writeFile(dir, name string, b []byte) error {
	return os.WriteFile(filepath.Join(dir, name), b, 0o600)
}

func pemBlock(kind string, der []byte) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: kind, Bytes: der})
}

func serial() *big.Int {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 62))
	if err != nil {
		panic(fmt.Sprintf("crypto/rand failed: %v", err))
	}
	return n
}
