// Command cilium-agent runs the ztunnel side of a Cilium agent for hboned's tests: Cilium's own
// ZDS server (github.com/cilium/cilium pkg/ztunnel/zds, built through its hive cell exactly as
// the agent builds it), which installs Cilium's in-pod iptables rules
// (pkg/ztunnel/iptables) in each pod's network namespace before sending the pod to the proxy;
// and an xDS server whose Address resources are made by Cilium's own encoding
// (pkg/ztunnel/xds EndpointEventCollection.ToDeltaDiscoveryResponse).
//
// Cilium's xDS stream handler cannot run outside the agent: it reads endpoints from the
// agent's CiliumEndpoint watcher (pkg/k8s/watchers, built only by the agent's hive from a live
// API server) and serves on fixed paths and ports (127.0.0.1:15012, /etc/ztunnel/*). The stream
// loop here follows pkg/ztunnel/xds/stream_processor.go: delta ADS only; an Address
// subscription is answered with every known workload in one response, then one response per
// change; an Authorization subscription with one empty response of nonce "0"; an ACK or NACK
// must carry a nonce that was sent (a NACK is only logged); any other type URL is an error.
//
// The test drives it over stdin, one JSON command a line, each answered on stdout by "ok" or
// "error: <why>":
//
//	{"op":"seed","pods":[POD...]}   the initial snapshot (SeedInitialSnapshot), once
//	{"op":"enroll","pod":POD}       EnrollEndpoint: rules in the pod, AddWorkload, its Ack
//	{"op":"disenroll","pod":POD}    DisenrollEndpoint: rules removed, DelWorkload, its Ack
//	{"op":"workload","pod":POD}     a CiliumEndpoint created or changed (xDS only)
//	{"op":"forget","pod":POD}       a CiliumEndpoint deleted (xDS only)
//
// POD is {"uid","name","namespace","serviceAccount","netns","ips":[...],"nodeIP"}.
package main

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"strings"
	"sync"

	"github.com/cilium/hive"
	"github.com/cilium/hive/cell"
	v3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	apimachineryTypes "k8s.io/apimachinery/pkg/types"

	"github.com/cilium/cilium/pkg/endpoint"
	"github.com/cilium/cilium/pkg/endpointmanager"
	v2 "github.com/cilium/cilium/pkg/k8s/apis/cilium.io/v2"
	slim_corev1 "github.com/cilium/cilium/pkg/k8s/slim/k8s/api/core/v1"
	slim_metav1 "github.com/cilium/cilium/pkg/k8s/slim/k8s/apis/meta/v1"
	"github.com/cilium/cilium/pkg/k8s/types"
	"github.com/cilium/cilium/pkg/option"
	"github.com/cilium/cilium/pkg/ztunnel/config"
	ciliumxds "github.com/cilium/cilium/pkg/ztunnel/xds"
	"github.com/cilium/cilium/pkg/ztunnel/zds"
)

const (
	typeAddress       = "type.googleapis.com/istio.workload.Address"
	typeAuthorization = "type.googleapis.com/istio.security.Authorization"
)

type pod struct {
	UID            string   `json:"uid"`
	Name           string   `json:"name"`
	Namespace      string   `json:"namespace"`
	ServiceAccount string   `json:"serviceAccount"`
	Netns          string   `json:"netns"`
	IPs            []string `json:"ips"`
	NodeIP         string   `json:"nodeIP"`
}

type command struct {
	Op   string `json:"op"`
	Pod  pod    `json:"pod"`
	Pods []pod  `json:"pods"`
}

// The agent's endpoint for a pod (as the ZDS server's own tests build one).
func (p pod) endpoint(id uint16) *endpoint.Endpoint {
	ep := &endpoint.Endpoint{
		ID:           id,
		K8sUID:       p.UID,
		K8sPodName:   p.Name,
		K8sNamespace: p.Namespace,
	}
	ep.SetPod(&slim_corev1.Pod{
		ObjectMeta: slim_metav1.ObjectMeta{
			Name:      p.Name,
			Namespace: p.Namespace,
			UID:       apimachineryTypes.UID(p.UID),
		},
		Spec: slim_corev1.PodSpec{ServiceAccountName: p.ServiceAccount},
	})
	ep.SetContainerNetnsPath(p.Netns)
	return ep
}

// The CiliumEndpoint of a pod, as the agent's watcher hands it to the xDS server.
func (p pod) ciliumEndpoint() *types.CiliumEndpoint {
	var addressing v2.AddressPairList
	for _, ip := range p.IPs {
		if strings.Contains(ip, ":") {
			addressing = append(addressing, &v2.AddressPair{IPV6: ip})
		} else {
			addressing = append(addressing, &v2.AddressPair{IPV4: ip})
		}
	}
	return &types.CiliumEndpoint{
		ObjectMeta: slim_metav1.ObjectMeta{
			Name:      p.Name,
			Namespace: p.Namespace,
			OwnerReferences: []slim_metav1.OwnerReference{{
				Kind: "Pod", Name: p.Name, UID: apimachineryTypes.UID(p.UID),
			}},
		},
		ServiceAccount: p.ServiceAccount,
		Networking: &v2.EndpointNetworking{
			Addressing: addressing,
			NodeIP:     p.NodeIP,
		},
	}
}

// xdsServer keeps the known CiliumEndpoints and the open streams.
type xdsServer struct {
	v3.UnimplementedAggregatedDiscoveryServiceServer
	log *slog.Logger

	mu        sync.Mutex
	endpoints map[string]*types.CiliumEndpoint
	streams   map[chan ciliumxds.EndpointEventCollection]struct{}
}

func (x *xdsServer) publish(events ciliumxds.EndpointEventCollection) {
	x.mu.Lock()
	defer x.mu.Unlock()
	for _, ev := range events {
		key := ev.Namespace + "/" + ev.Name
		if ev.Type == ciliumxds.REMOVED {
			delete(x.endpoints, key)
		} else {
			x.endpoints[key] = ev.CiliumEndpoint
		}
	}
	for ch := range x.streams {
		ch <- events
	}
}

func (x *xdsServer) StreamAggregatedResources(v3.AggregatedDiscoveryService_StreamAggregatedResourcesServer) error {
	// As Cilium's server: state of the world is not served.
	return fmt.Errorf("unimplemented")
}

func (x *xdsServer) DeltaAggregatedResources(stream v3.AggregatedDiscoveryService_DeltaAggregatedResourcesServer) error {
	ctx := stream.Context()
	requests := make(chan *v3.DeltaDiscoveryRequest, 1)
	go func() {
		defer close(requests)
		for {
			req, err := stream.Recv()
			if err != nil {
				return
			}
			requests <- req
		}
	}()
	events := make(chan ciliumxds.EndpointEventCollection, 64)
	expected := map[string]struct{}{}
	subscribed := false
	defer func() {
		x.mu.Lock()
		delete(x.streams, events)
		x.mu.Unlock()
	}()
	for {
		select {
		case <-ctx.Done():
			return nil
		case req, ok := <-requests:
			if !ok {
				return nil
			}
			if req.ResponseNonce != "" {
				if _, ok := expected[req.ResponseNonce]; !ok {
					x.log.Error("unexpected nonce", "nonce", req.ResponseNonce)
					continue
				}
				delete(expected, req.ResponseNonce)
				if req.ErrorDetail != nil {
					x.log.Error("Nack received from ztunnel", "error", req.ErrorDetail.Message)
				}
				continue
			}
			switch req.TypeUrl {
			case typeAddress:
				if subscribed {
					continue
				}
				subscribed = true
				// The current endpoints in one response, then every change.
				x.mu.Lock()
				var all ciliumxds.EndpointEventCollection
				for _, ep := range x.endpoints {
					all = append(all, &ciliumxds.EndpointEvent{Type: ciliumxds.CREATE, CiliumEndpoint: ep})
				}
				x.streams[events] = struct{}{}
				x.mu.Unlock()
				resp := all.ToDeltaDiscoveryResponse()
				expected[resp.Nonce] = struct{}{}
				if err := stream.Send(resp); err != nil {
					return err
				}
			case typeAuthorization:
				expected["0"] = struct{}{}
				if err := stream.Send(&v3.DeltaDiscoveryResponse{
					TypeUrl: typeAuthorization, Resources: []*v3.Resource{}, RemovedResources: []string{}, Nonce: "0",
				}); err != nil {
					return err
				}
			default:
				x.log.Error("unexpected type URL", "type", req.TypeUrl)
			}
		case batch := <-events:
			resp := batch.ToDeltaDiscoveryResponse()
			expected[resp.Nonce] = struct{}{}
			if err := stream.Send(resp); err != nil {
				return err
			}
		}
	}
}

func main() {
	zdsPath := flag.String("zds", "/var/run/cilium/ztunnel.sock", "the ZDS socket")
	xdsListen := flag.String("xds-listen", "127.0.0.1:15012", "the xDS server's TCP address")
	xdsCert := flag.String("xds-cert", "", "the xDS server's certificate (the bootstrap certificate)")
	xdsKey := flag.String("xds-key", "", "its key")
	flag.Parse()
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	// The agent's defaults on a dual-stack node.
	option.Config.EnableIPv4 = true
	option.Config.EnableIPv6 = true

	x := &xdsServer{log: log, endpoints: map[string]*types.CiliumEndpoint{}, streams: map[chan ciliumxds.EndpointEventCollection]struct{}{}}
	if *xdsCert != "" {
		cert, err := tls.LoadX509KeyPair(*xdsCert, *xdsKey)
		if err != nil {
			fail(err)
		}
		l, err := net.Listen("tcp", *xdsListen)
		if err != nil {
			fail(err)
		}
		g := grpc.NewServer(grpc.Creds(credentials.NewTLS(&tls.Config{Certificates: []tls.Certificate{cert}})))
		v3.RegisterAggregatedDiscoveryServiceServer(g, x)
		go func() { _ = g.Serve(l) }()
	}

	var enroller zds.EndpointEnroller
	h := hive.New(
		cell.Provide(
			func() config.Config { return config.Config{EnableZTunnel: true} },
			func() endpointmanager.EndpointManager { return nil },
			func() string { return *zdsPath },
		),
		zds.Cell,
		cell.Invoke(func(e zds.EndpointEnroller) { enroller = e }),
	)
	if err := h.Start(log, context.Background()); err != nil {
		fail(err)
	}
	fmt.Println("ready")

	in := bufio.NewReader(os.Stdin)
	var next uint16 = 1
	ids := map[string]uint16{}
	id := func(uid string) uint16 {
		if n, ok := ids[uid]; ok {
			return n
		}
		ids[uid] = next
		next++
		return ids[uid]
	}
	for {
		line, err := in.ReadString('\n')
		if err == io.EOF {
			_ = h.Stop(log, context.Background())
			return
		}
		if err != nil {
			fail(err)
		}
		var c command
		if err := json.Unmarshal([]byte(line), &c); err != nil {
			reply(err)
			continue
		}
		switch c.Op {
		case "seed":
			eps := make([]*endpoint.Endpoint, 0, len(c.Pods))
			for _, p := range c.Pods {
				eps = append(eps, p.endpoint(id(p.UID)))
			}
			enroller.SeedInitialSnapshot(eps...)
			reply(nil)
		case "enroll":
			reply(enroller.EnrollEndpoint(c.Pod.endpoint(id(c.Pod.UID))))
		case "disenroll":
			reply(enroller.DisenrollEndpoint(c.Pod.endpoint(id(c.Pod.UID))))
		case "workload":
			x.publish(ciliumxds.EndpointEventCollection{{Type: ciliumxds.CREATE, CiliumEndpoint: c.Pod.ciliumEndpoint()}})
			reply(nil)
		case "forget":
			x.publish(ciliumxds.EndpointEventCollection{{Type: ciliumxds.REMOVED, CiliumEndpoint: c.Pod.ciliumEndpoint()}})
			reply(nil)
		default:
			reply(fmt.Errorf("unknown op %q", c.Op))
		}
	}
}

func reply(err error) {
	if err != nil {
		fmt.Printf("error: %s\n", strings.ReplaceAll(err.Error(), "\n", " "))
	} else {
		fmt.Println("ok")
	}
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, err)
	os.Exit(1)
}
