// Command cri-runtime answers the Container Runtime Interface calls a node proxy makes to find a
// pod's processes, on the CRI's own Go types (k8s.io/cri-api pkg/apis/runtime/v1), the way
// containerd's CRI plugin answers them:
//
//   - ListPodSandbox filters by id, state and labels; every sandbox carries the pod's UID as
//     the label io.kubernetes.pod.uid (containerd internal/cri/server/sandbox_list.go,
//     filterCRISandboxes; kubelet sets the label).
//   - ListContainers filters by id, sandbox id, state and labels
//     (internal/cri/server/container_list.go, filterCRIContainers). The sandbox's own pause
//     container is not among a sandbox's containers.
//   - ContainerStatus with verbose puts a JSON document under info["info"] whose "pid" is the
//     container's init process as the host sees it, with "sandboxID" beside it
//     (internal/cri/server/container_status.go, toCRIContainerInfo); an unknown container is
//     NotFound.
//
// The node's pods come from a JSON file re-read at every call, so a test can change them:
// [{"uid","sandbox","ready":bool,"containers":[{"id","pid","running":bool,"createdAt"}]}].
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"net"
	"os"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"
)

const podUIDLabel = "io.kubernetes.pod.uid"

type container struct {
	ID        string `json:"id"`
	PID       int    `json:"pid"`
	Running   bool   `json:"running"`
	CreatedAt int64  `json:"createdAt"`
}

type pod struct {
	UID        string      `json:"uid"`
	Sandbox    string      `json:"sandbox"`
	Ready      bool        `json:"ready"`
	Containers []container `json:"containers"`
}

type server struct {
	runtime.UnimplementedRuntimeServiceServer
	file string
}

func (s *server) pods() ([]pod, error) {
	data, err := os.ReadFile(s.file)
	if err != nil {
		return nil, status.Errorf(codes.Internal, "reading the node's pods: %v", err)
	}
	var pods []pod
	if err := json.Unmarshal(data, &pods); err != nil {
		return nil, status.Errorf(codes.Internal, "parsing the node's pods: %v", err)
	}
	return pods, nil
}

func labelsMatch(want, have map[string]string) bool {
	for k, v := range want {
		if have[k] != v {
			return false
		}
	}
	return true
}

func (s *server) ListPodSandbox(_ context.Context, req *runtime.ListPodSandboxRequest) (*runtime.ListPodSandboxResponse, error) {
	pods, err := s.pods()
	if err != nil {
		return nil, err
	}
	f := req.GetFilter()
	var items []*runtime.PodSandbox
	for _, p := range pods {
		state := runtime.PodSandboxState_SANDBOX_NOTREADY
		if p.Ready {
			state = runtime.PodSandboxState_SANDBOX_READY
		}
		sb := &runtime.PodSandbox{
			Id:     p.Sandbox,
			State:  state,
			Labels: map[string]string{podUIDLabel: p.UID},
		}
		if f != nil {
			if f.GetId() != "" && f.GetId() != sb.Id {
				continue
			}
			if f.GetState() != nil && f.GetState().GetState() != sb.State {
				continue
			}
			if !labelsMatch(f.GetLabelSelector(), sb.Labels) {
				continue
			}
		}
		items = append(items, sb)
	}
	return &runtime.ListPodSandboxResponse{Items: items}, nil
}

func (s *server) ListContainers(_ context.Context, req *runtime.ListContainersRequest) (*runtime.ListContainersResponse, error) {
	pods, err := s.pods()
	if err != nil {
		return nil, err
	}
	f := req.GetFilter()
	var out []*runtime.Container
	for _, p := range pods {
		for _, c := range p.Containers {
			state := runtime.ContainerState_CONTAINER_EXITED
			if c.Running {
				state = runtime.ContainerState_CONTAINER_RUNNING
			}
			rc := &runtime.Container{
				Id:           c.ID,
				PodSandboxId: p.Sandbox,
				State:        state,
				CreatedAt:    c.CreatedAt,
				Labels:       map[string]string{podUIDLabel: p.UID},
			}
			if f != nil {
				if f.GetId() != "" && f.GetId() != rc.Id {
					continue
				}
				if f.GetPodSandboxId() != "" && f.GetPodSandboxId() != rc.PodSandboxId {
					continue
				}
				if f.GetState() != nil && f.GetState().GetState() != rc.State {
					continue
				}
				if !labelsMatch(f.GetLabelSelector(), rc.Labels) {
					continue
				}
			}
			out = append(out, rc)
		}
	}
	return &runtime.ListContainersResponse{Containers: out}, nil
}

func (s *server) ContainerStatus(_ context.Context, req *runtime.ContainerStatusRequest) (*runtime.ContainerStatusResponse, error) {
	pods, err := s.pods()
	if err != nil {
		return nil, err
	}
	for _, p := range pods {
		for _, c := range p.Containers {
			if c.ID != req.GetContainerId() {
				continue
			}
			state := runtime.ContainerState_CONTAINER_EXITED
			pid := 0
			if c.Running {
				state, pid = runtime.ContainerState_CONTAINER_RUNNING, c.PID
			}
			resp := &runtime.ContainerStatusResponse{Status: &runtime.ContainerStatus{
				Id: c.ID, State: state, CreatedAt: c.CreatedAt,
			}}
			if req.GetVerbose() {
				info, err := json.Marshal(map[string]any{
					"sandboxID":   p.Sandbox,
					"pid":         pid,
					"removing":    false,
					"snapshotKey": c.ID,
					"snapshotter": "overlayfs",
					"runtimeType": "io.containerd.runc.v2",
				})
				if err != nil {
					return nil, status.Errorf(codes.Internal, "%v", err)
				}
				resp.Info = map[string]string{"info": string(info)}
			}
			return resp, nil
		}
	}
	return nil, status.Errorf(codes.NotFound, "an error occurred when try to find container %q: not found", req.GetContainerId())
}

func main() {
	socket := flag.String("socket", "", "the CRI socket to serve")
	pods := flag.String("pods", "", "the JSON file of the node's pods")
	flag.Parse()
	_ = os.Remove(*socket)
	l, err := net.Listen("unix", *socket)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	g := grpc.NewServer()
	runtime.RegisterRuntimeServiceServer(g, &server{file: *pods})
	fmt.Println("ready")
	if err := g.Serve(l); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
