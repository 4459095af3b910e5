// Command istioctl-apiserver answers the Kubernetes API calls `istioctl ztunnel-config` makes
// to reach a ztunnel's admin port, so that the real istioctl can run against hboned in a test:
// the ztunnel pod and its DaemonSet (what `IsZtunnelPod` and `InferPodsFromTypedResource`
// read), the server version, and the pod's port-forward, served as the kubelet serves it
// through the API server (SPDY/3.1 with the portforward.k8s.io protocol, whose streams are
// upgraded by k8s.io/streaming, the kubelet's own code) to a fixed TCP address instead of the
// pod's netns.
//
// A fake, not a real API server: kube-apiserver cannot run here (no etcd, no kubelet).
// Behaviour by behaviour it follows:
//   - k8s.io/kubelet's streaming/portforward/httpstream.go: the error and data stream pair of
//     one requestID, the port header, the error stream carrying a dial failure;
//   - istio/pkg/kube/portforwarder.go: istioctl dials POST .../pods/<name>/portforward, SPDY
//     only when KUBECTL_PORT_FORWARD_WEBSOCKETS=false (the test sets it).
//
// Usage: istioctl-apiserver -listen 127.0.0.1:0 -target 127.0.0.1:15000 -pod ztunnel-abc
// -namespace istio-system -node node-a. The chosen address is printed as "listening on ADDR".
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"

	"sync"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/version"
	"k8s.io/streaming/pkg/httpstream"
	"k8s.io/streaming/pkg/httpstream/spdy"
)

const portForwardProtocol = "portforward.k8s.io"

func main() {
	listen := flag.String("listen", "127.0.0.1:0", "address to serve the API on")
	target := flag.String("target", "127.0.0.1:15000", "where the pod's port-forward goes")
	pod := flag.String("pod", "ztunnel-test", "the ztunnel pod's name")
	namespace := flag.String("namespace", "istio-system", "the ztunnel pod's namespace")
	node := flag.String("node", "node-a", "the ztunnel pod's node")
	flag.Parse()

	labels := map[string]string{"app": "ztunnel"}
	thePod := corev1.Pod{
		TypeMeta:   metav1.TypeMeta{Kind: "Pod", APIVersion: "v1"},
		ObjectMeta: metav1.ObjectMeta{Name: *pod, Namespace: *namespace, Labels: labels, UID: "0a0a0a0a-0000-4000-8000-000000000001"},
		Spec:       corev1.PodSpec{NodeName: *node, Containers: []corev1.Container{{Name: "istio-proxy", Image: "hboned"}}},
		Status:     corev1.PodStatus{Phase: corev1.PodRunning, PodIP: "127.0.0.1"},
	}
	daemonSet := appsv1.DaemonSet{
		TypeMeta:   metav1.TypeMeta{Kind: "DaemonSet", APIVersion: "apps/v1"},
		ObjectMeta: metav1.ObjectMeta{Name: "ztunnel", Namespace: *namespace, Labels: labels},
		Spec:       appsv1.DaemonSetSpec{Selector: &metav1.LabelSelector{MatchLabels: labels}},
	}
	podPath := fmt.Sprintf("/api/v1/namespaces/%s/pods/%s", *namespace, *pod)

	mux := http.NewServeMux()
	mux.HandleFunc("/version", func(w http.ResponseWriter, _ *http.Request) {
		writeJSON(w, version.Info{Major: "1", Minor: "34", GitVersion: "v1.34.0"})
	})
	mux.HandleFunc(podPath, func(w http.ResponseWriter, _ *http.Request) { writeJSON(w, thePod) })
	mux.HandleFunc(fmt.Sprintf("/api/v1/namespaces/%s/pods", *namespace), func(w http.ResponseWriter, _ *http.Request) {
		writeJSON(w, corev1.PodList{TypeMeta: metav1.TypeMeta{Kind: "PodList", APIVersion: "v1"}, Items: []corev1.Pod{thePod}})
	})
	mux.HandleFunc(fmt.Sprintf("/apis/apps/v1/namespaces/%s/daemonsets/ztunnel", *namespace), func(w http.ResponseWriter, _ *http.Request) {
		writeJSON(w, daemonSet)
	})
	mux.HandleFunc(podPath+"/portforward", func(w http.ResponseWriter, r *http.Request) {
		portForward(w, r, *target)
	})
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		log.Printf("not served: %s %s", r.Method, r.URL)
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusNotFound)
		writeJSON(w, metav1.Status{TypeMeta: metav1.TypeMeta{Kind: "Status", APIVersion: "v1"}, Status: "Failure", Reason: metav1.StatusReasonNotFound, Code: 404})
	})

	l, err := net.Listen("tcp", *listen)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Printf("listening on %s\n", l.Addr())
	log.Fatal(http.Serve(l, mux))
}

func writeJSON(w http.ResponseWriter, v any) {
	if w.Header().Get("Content-Type") == "" {
		w.Header().Set("Content-Type", "application/json")
	}
	_ = json.NewEncoder(w).Encode(v)
}

// portForward serves one port-forward session: each requestID's data stream is joined to a
// new connection to target; a failed dial is reported on its error stream.
func portForward(w http.ResponseWriter, r *http.Request, target string) {
	if _, err := httpstream.Handshake(r, w, []string{portForwardProtocol}); err != nil {
		http.Error(w, err.Error(), http.StatusForbidden)
		return
	}
	streams := make(chan httpstream.Stream, 8)
	conn := spdy.NewResponseUpgrader().UpgradeResponse(w, r, func(s httpstream.Stream, replySent <-chan struct{}) error {
		streams <- s
		return nil
	})
	if conn == nil {
		return
	}
	defer conn.Close()
	conn.SetIdleTimeout(10 * time.Minute)
	var mu sync.Mutex
	errorStreams := map[string]httpstream.Stream{}
	for {
		select {
		case <-conn.CloseChan():
			return
		case s := <-streams:
			id := s.Headers().Get(corev1.PortForwardRequestIDHeader)
			switch s.Headers().Get(corev1.StreamType) {
			case corev1.StreamTypeError:
				mu.Lock()
				errorStreams[id] = s
				mu.Unlock()
			case corev1.StreamTypeData:
				mu.Lock()
				errStream := errorStreams[id]
				delete(errorStreams, id)
				mu.Unlock()
				go forward(s, errStream, target)
			default:
				s.Reset()
			}
		}
	}
}

func forward(data, errStream httpstream.Stream, target string) {
	defer data.Close()
	if errStream != nil {
		defer errStream.Close()
	}
	upstream, err := net.Dial("tcp", target)
	if err != nil {
		if errStream != nil {
			_, _ = io.WriteString(errStream, fmt.Sprintf("error forwarding to %s: %v", target, err))
		}
		return
	}
	defer upstream.Close()
	done := make(chan struct{}, 2)
	go func() { _, _ = io.Copy(upstream, data); closeWrite(upstream); done <- struct{}{} }()
	go func() { _, _ = io.Copy(data, upstream); done <- struct{}{} }()
	<-done
	<-done
}

func closeWrite(c net.Conn) {
	if tc, ok := c.(*net.TCPConn); ok {
		_ = tc.CloseWrite()
	}
}
