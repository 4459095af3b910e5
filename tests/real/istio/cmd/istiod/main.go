// Command istiod runs istiod's own discovery code for a test: pilot/test/xds's
// FakeDiscoveryServer, which is istiod's DiscoveryServer with its real xDS generators (the
// ambient WDS/Address and Authorization generators ztunnel subscribes to) and the ambient index
// built as istiod's bootstrap builds it, over an in-memory Kubernetes (a fake clientset, since
// no API server runs here) loaded from YAML files: Namespaces, Pods, Services, ServiceEntries,
// AuthorizationPolicies, PeerAuthentications. It serves delta ADS in plaintext gRPC on a TCP
// address (istiod's 15010), with ambient on as istiod turns it on (PILOT_ENABLE_AMBIENT=true in
// the environment: the flag is read when the process starts, so the caller sets it).
//
// With -ca-listen, it also serves istiod's CA (ca.go), over TLS for istiod.istio-system.svc.
//
// Usage: istiod -listen 198.18.0.2:0 -trust-domain example.org -objects a.yaml[,b.yaml]
// [-ca-listen 198.18.0.2:0 -ca-root root.pem -token TOKEN=NS/SA/POD/UID ...]
// Prints "xds listening on ADDR" once discovery has synced (and "ca listening on ADDR").
// With -proto-shape workload|authorization it prints the shape of that proto instead (shapes.go). Then reads commands on stdin, one
// per line, answering "ok" or "error: ..." on stdout:
//
//	delete pod <namespace> <name>
//	apply <file>          (Pods and AuthorizationPolicies: created, or updated when present)
package main

import (
	"bufio"
	"context"
	"flag"
	"fmt"
	"log"
	"net"
	"os"
	"strings"
	"sync"

	corev1 "k8s.io/api/core/v1"
	kerrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"

	securityclient "istio.io/client-go/pkg/apis/security/v1"
	"istio.io/istio/pilot/pkg/features"
	"istio.io/istio/pilot/test/xds"
	"istio.io/istio/pkg/cluster"
	"istio.io/istio/pkg/config/mesh"
	kubelib "istio.io/istio/pkg/kube"
	istiolog "istio.io/istio/pkg/log"
)

// failer is the test.Failer the fake server wants, for a process: a failure ends it.
type failer struct {
	mu       sync.Mutex
	cleanups []func()
}

func (f *failer) Fail()                          { log.Fatal("failed") }
func (f *failer) FailNow()                       { log.Fatal("failed") }
func (f *failer) Fatal(args ...any)              { log.Fatal(args...) }
func (f *failer) Fatalf(format string, a ...any) { log.Fatalf(format, a...) }
func (f *failer) Log(args ...any)                { log.Print(args...) }
func (f *failer) Logf(format string, a ...any)   { log.Printf(format, a...) }
func (f *failer) Helper()                        {}
func (f *failer) Skip(args ...any)               { log.Fatal(append([]any{"skip: "}, args...)...) }
func (f *failer) TempDir() string {
	d, err := os.MkdirTemp("", "istiod")
	if err != nil {
		log.Fatal(err)
	}
	return d
}

func (f *failer) Cleanup(fn func()) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.cleanups = append(f.cleanups, fn)
}

func main() {
	listen := flag.String("listen", "127.0.0.1:0", "where to serve delta ADS (plaintext gRPC)")
	trustDomain := flag.String("trust-domain", "cluster.local", "meshConfig.trustDomain")
	objects := flag.String("objects", "", "comma-separated YAML files of Kubernetes and Istio objects")
	cluster := flag.String("cluster", "Kubernetes", "the cluster id")
	caListen := flag.String("ca-listen", "", "where to serve istiod's CA (gRPC over TLS, as istiod's 15012); empty: no CA")
	caRoot := flag.String("ca-root", "root-cert.pem", "where to write the CA's root (it signed the CA's serving certificate)")
	var tokens tokenFlags
	flag.Var(&tokens, "token", "TOKEN=NAMESPACE/SERVICEACCOUNT/POD/UID: a service account token the API server's TokenReview accepts (repeatable)")
	shape := flag.String("proto-shape", "", "workload or authorization: print the fields and enum values of istiod's proto of that name, and exit")
	flag.Parse()
	if *shape != "" {
		lines := protoShape(*shape)
		if lines == nil {
			log.Fatalf("no proto named %q", *shape)
		}
		for _, line := range lines {
			fmt.Println(line)
		}
		return
	}
	// istiod's logs to stderr: stdout carries this driver's replies.
	logOptions := istiolog.DefaultOptions()
	logOptions.OutputPaths = []string{"stderr"}
	logOptions.ErrorOutputPaths = []string{"stderr"}
	if err := istiolog.Configure(logOptions); err != nil {
		log.Fatal(err)
	}
	if !features.EnableAmbient {
		log.Fatal("PILOT_ENABLE_AMBIENT=true must be in the environment, as istiod's chart sets it for ambient")
	}
	var yaml []string
	for _, path := range strings.Split(*objects, ",") {
		if path == "" {
			continue
		}
		b, err := os.ReadFile(path)
		if err != nil {
			log.Fatal(err)
		}
		yaml = append(yaml, string(b))
	}
	m := mesh.DefaultMeshConfig()
	m.TrustDomain = *trustDomain

	l, err := net.Listen("tcp", *listen)
	if err != nil {
		log.Fatal(err)
	}
	t := &failer{}
	s := xds.NewFakeDiscoveryServer(t, xds.FakeOptions{
		DefaultClusterName:     clusterID(*cluster),
		KubernetesObjectString: strings.Join(yaml, "\n---\n"),
		MeshConfig:             m,
		ListenerBuilder:        func() (net.Listener, error) { return l, nil },
	})
	fmt.Printf("xds listening on %s\n", l.Addr())
	if *caListen != "" {
		addr, err := serveCA(s, clusterID(*cluster), *caListen, *caRoot, tokens)
		if err != nil {
			log.Fatal(err)
		}
		fmt.Printf("ca listening on %s\n", addr)
	}

	in := bufio.NewScanner(os.Stdin)
	for in.Scan() {
		if err := command(s.KubeClient(), strings.Fields(in.Text())); err != nil {
			fmt.Printf("error: %v\n", err)
		} else {
			fmt.Println("ok")
		}
	}
	// stdin closed: serve on until killed.
	select {}
}

func command(c kubelib.Client, words []string) error {
	ctx := context.Background()
	switch {
	case len(words) == 4 && words[0] == "delete" && words[1] == "pod":
		return c.Kube().CoreV1().Pods(words[2]).Delete(ctx, words[3], metav1.DeleteOptions{})
	case len(words) == 2 && words[0] == "apply":
		b, err := os.ReadFile(words[1])
		if err != nil {
			return err
		}
		for _, doc := range strings.Split(string(b), "\n---\n") {
			if strings.TrimSpace(doc) == "" {
				continue
			}
			o, _, err := kubelib.IstioCodec.UniversalDeserializer().Decode([]byte(doc), nil, nil)
			if err != nil {
				return err
			}
			if err := apply(ctx, c, o); err != nil {
				return err
			}
		}
		return nil
	}
	return fmt.Errorf("unknown command %q", strings.Join(words, " "))
}

func apply(ctx context.Context, c kubelib.Client, o runtime.Object) error {
	switch o := o.(type) {
	case *corev1.Pod:
		pods := c.Kube().CoreV1().Pods(o.Namespace)
		if _, err := pods.Create(ctx, o, metav1.CreateOptions{}); kerrors.IsAlreadyExists(err) {
			_, err = pods.Update(ctx, o, metav1.UpdateOptions{})
			return err
		} else {
			return err
		}
	case *securityclient.AuthorizationPolicy:
		policies := c.Istio().SecurityV1().AuthorizationPolicies(o.Namespace)
		if _, err := policies.Create(ctx, o, metav1.CreateOptions{}); kerrors.IsAlreadyExists(err) {
			_, err = policies.Update(ctx, o, metav1.UpdateOptions{})
			return err
		} else {
			return err
		}
	}
	return fmt.Errorf("cannot apply a %T", o)
}

func clusterID(s string) cluster.ID { return cluster.ID(s) }
