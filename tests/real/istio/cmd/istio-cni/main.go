// Command istio-cni runs istio-cni's own ZDS server (istio/istio cni/pkg/nodeagent
// ztunnelserver.go and ztunnelserver_linux.go: the unixpacket listener, the hello, the snapshot
// of the node's pods on each connection, the newest connection taking over, Add with the pod's
// netns descriptor, Del, keepalives) for a test, driven over stdin as the node agent's pod
// events would drive it. The server's constructor and methods are unexported (the agent builds
// it inside NewServer, which also wants a live API server and installs iptables rules), so they
// are reached by go:linkname; nothing of their code is copied. The pod cache the server reads
// its snapshot from is the exported PodNetnsCache interface, held here as the agent's
// podNetnsCache holds it: a pod is cached (with its netns, opened by nodeagent.OpenNetns)
// before it is added, and forgotten after it is deleted.
//
// Usage: istio-cni -socket /var/run/ztunnel/ztunnel.sock [-pod UID,NAME,NAMESPACE,SA,NETNS]...
// (pods already on the node when the agent starts). Prints "listening" once the socket is
// bound, then reads commands, answering "ok" or "error: ...":
//
//	add UID NAME NAMESPACE SERVICEACCOUNT NETNS-PATH
//	del UID
package main

import (
	"bufio"
	"context"
	"flag"
	"fmt"
	"log"
	"os"
	"strings"
	"sync"
	"time"
	_ "unsafe" // go:linkname

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	"istio.io/istio/cni/pkg/nodeagent"
	istiolog "istio.io/istio/pkg/log"
	zdsapi "istio.io/istio/pkg/zdsapi"
)

// server stands for nodeagent's *ztunnelServer (a pointer either way).
type server struct{ _ [0]byte }

//go:linkname newZtunnelServer istio.io/istio/cni/pkg/nodeagent.newZtunnelServer
func newZtunnelServer(addr string, pods nodeagent.PodNetnsCache, keepaliveInterval time.Duration) (*server, error)

//go:linkname serverRun istio.io/istio/cni/pkg/nodeagent.(*ztunnelServer).Run
func serverRun(z *server, ctx context.Context)

//go:linkname serverPodAdded istio.io/istio/cni/pkg/nodeagent.(*ztunnelServer).PodAdded
func serverPodAdded(z *server, ctx context.Context, pod *corev1.Pod, netns nodeagent.Netns) error

//go:linkname serverPodDeleted istio.io/istio/cni/pkg/nodeagent.(*ztunnelServer).PodDeleted
func serverPodDeleted(z *server, ctx context.Context, uid string) error

// cache is the node's pods as the agent holds them (nodeagent.PodNetnsCache).
type cache struct {
	mu   sync.Mutex
	pods map[string]nodeagent.WorkloadInfo
}

func (c *cache) ReadCurrentPodSnapshot() map[string]nodeagent.WorkloadInfo {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := make(map[string]nodeagent.WorkloadInfo, len(c.pods))
	for k, v := range c.pods {
		out[k] = v
	}
	return out
}

type podFlags []string

func (p *podFlags) String() string     { return strings.Join(*p, " ") }
func (p *podFlags) Set(v string) error { *p = append(*p, v); return nil }

func pod(uid, name, namespace, sa string) *corev1.Pod {
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: namespace, UID: types.UID(uid)},
		Spec:       corev1.PodSpec{ServiceAccountName: sa},
	}
}

func main() {
	socket := flag.String("socket", "/var/run/ztunnel/ztunnel.sock", "the ZDS socket")
	var preload podFlags
	flag.Var(&preload, "pod", "UID,NAME,NAMESPACE,SA,NETNS: a pod already on the node (repeatable)")
	flag.Parse()
	// istio-cni's logs to stderr: stdout carries this driver's replies.
	logOptions := istiolog.DefaultOptions()
	logOptions.OutputPaths = []string{"stderr"}
	logOptions.ErrorOutputPaths = []string{"stderr"}
	if err := istiolog.Configure(logOptions); err != nil {
		log.Fatal(err)
	}
	pods := &cache{pods: map[string]nodeagent.WorkloadInfo{}}
	cacheAdd := func(uid, name, namespace, sa, path string) (nodeagent.NetnsCloser, error) {
		ns, err := nodeagent.OpenNetns(path)
		if err != nil {
			return nil, err
		}
		pods.mu.Lock()
		defer pods.mu.Unlock()
		pods.pods[uid] = nodeagent.WorkloadInfo{
			Workload: &zdsapi.WorkloadInfo{Name: name, Namespace: namespace, ServiceAccount: sa},
			Netns:    ns,
		}
		return ns, nil
	}
	for _, p := range preload {
		f := strings.Split(p, ",")
		if len(f) != 5 {
			log.Fatalf("-pod %q: want UID,NAME,NAMESPACE,SA,NETNS", p)
		}
		if _, err := cacheAdd(f[0], f[1], f[2], f[3], f[4]); err != nil {
			log.Fatal(err)
		}
	}
	// The keepalive istio-cni's server runs with (cni/pkg/nodeagent/server.go).
	z, err := newZtunnelServer(*socket, pods, 5*time.Second)
	if err != nil {
		log.Fatal(err)
	}
	ctx := context.Background()
	go serverRun(z, ctx)
	fmt.Println("listening")

	in := bufio.NewScanner(os.Stdin)
	for in.Scan() {
		w := strings.Fields(in.Text())
		var err error
		switch {
		case len(w) == 6 && w[0] == "add":
			var ns nodeagent.NetnsCloser
			if ns, err = cacheAdd(w[1], w[2], w[3], w[4], w[5]); err == nil {
				err = serverPodAdded(z, ctx, pod(w[1], w[2], w[3], w[4]), ns)
			}
		case len(w) == 2 && w[0] == "del":
			if err = serverPodDeleted(z, ctx, w[1]); err == nil {
				pods.mu.Lock()
				if p, ok := pods.pods[w[1]]; ok {
					_ = p.Netns.Close()
					delete(pods.pods, w[1])
				}
				pods.mu.Unlock()
			}
		default:
			err = fmt.Errorf("unknown command %q", in.Text())
		}
		if err != nil {
			fmt.Printf("error: %v\n", err)
		} else {
			fmt.Println("ok")
		}
	}
	select {}
}
