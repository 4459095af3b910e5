package main

// istiod's CA server (security/pkg/server/ca) as istiod runs it for ztunnels: a self-signed
// Istio CA, the Kubernetes JWT authenticator, and the node authorizer that lets a node proxy's
// service account (CA_TRUSTED_NODE_ACCOUNTS, set by the caller as istiod's chart sets it)
// impersonate the identities of pods on its own node. What cannot run here is the API server's
// TokenReview: tokens given with -token are answered as kube-apiserver answers a bound service
// account token (pkg/serviceaccount/claims.go: user system:serviceaccount:<ns>:<sa>, groups
// system:serviceaccounts, extra authentication.kubernetes.io/pod-name and pod-uid); any other
// token is not authenticated.

import (
	"context"
	"crypto/tls"
	"fmt"
	"log"
	"net"
	"os"
	"strings"
	"time"

	authenticationv1 "k8s.io/api/authentication/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"

	"istio.io/istio/pilot/test/xds"
	"istio.io/istio/pkg/cluster"
	"istio.io/istio/pkg/config/mesh/meshwatcher"
	"istio.io/istio/pkg/kube/multicluster"
	"istio.io/istio/pkg/security"
	"istio.io/istio/security/pkg/pki/ca"
	caserver "istio.io/istio/security/pkg/server/ca"
	"istio.io/istio/security/pkg/server/ca/authenticate/kubeauth"
)

// tokenFlags collects -token TOKEN=NAMESPACE/SERVICEACCOUNT/POD/UID.
type tokenFlags map[string][4]string

func (t *tokenFlags) String() string { return fmt.Sprint(len(*t), " tokens") }

func (t *tokenFlags) Set(v string) error {
	token, who, ok := strings.Cut(v, "=")
	parts := strings.Split(who, "/")
	if !ok || len(parts) != 4 {
		return fmt.Errorf("want TOKEN=NAMESPACE/SERVICEACCOUNT/POD/UID, got %q", v)
	}
	if *t == nil {
		*t = tokenFlags{}
	}
	(*t)[token] = [4]string{parts[0], parts[1], parts[2], parts[3]}
	return nil
}

// serveCA serves istiod's CA over TLS, as istiod does on 15012: its serving certificate, for
// istiod.istio-system.svc, issued by its own CA (as istiod issues its DNS certificate), whose
// root is written to rootOut for the clients.
func serveCA(s *xds.FakeDiscoveryServer, id cluster.ID, listen, rootOut string, tokens tokenFlags) (net.Addr, error) {
	client := s.KubeClient()
	clientset, ok := client.Kube().(*fake.Clientset)
	if !ok {
		return nil, fmt.Errorf("the discovery server's client is not a fake clientset")
	}
	clientset.PrependReactor("create", "tokenreviews", func(action k8stesting.Action) (bool, runtime.Object, error) {
		review := action.(k8stesting.CreateAction).GetObject().(*authenticationv1.TokenReview)
		out := review.DeepCopy()
		who, known := tokens[review.Spec.Token]
		if !known {
			out.Status = authenticationv1.TokenReviewStatus{Authenticated: false, Error: "invalid bearer token"}
			return true, out, nil
		}
		out.Status = authenticationv1.TokenReviewStatus{
			Authenticated: true,
			Audiences:     review.Spec.Audiences,
			User: authenticationv1.UserInfo{
				Username: "system:serviceaccount:" + who[0] + ":" + who[1],
				UID:      who[3],
				Groups:   []string{"system:serviceaccounts", "system:serviceaccounts:" + who[0], "system:authenticated"},
				Extra: map[string]authenticationv1.ExtraValue{
					"authentication.kubernetes.io/pod-name": {who[2]},
					"authentication.kubernetes.io/pod-uid":  {who[3]},
				},
			},
		}
		return true, out, nil
	})

	ctx := context.Background()
	opts, err := ca.NewSelfSignedIstioCAOptions(ctx, 0, 24*time.Hour, time.Hour, time.Hour, 24*time.Hour,
		s.Env().Mesh().GetTrustDomain(), false, false, "istio-system", clientset.CoreV1(), "", false, 2048)
	if err != nil {
		return nil, err
	}
	istioCA, err := ca.NewIstioCA(opts)
	if err != nil {
		return nil, err
	}
	stop := make(chan struct{})
	clusters := multicluster.NewFakeController()
	authenticator := kubeauth.NewKubeJWTAuthenticator(meshwatcher.NewTestWatcher(s.Env().Mesh()), clientset, id, nil, nil)
	server, err := caserver.New(istioCA, 24*time.Hour, []security.Authenticator{logged{authenticator}}, clusters)
	if err != nil {
		return nil, err
	}
	clusters.Add(id, client, stop)
	client.RunAndWait(stop)
	certPEM, keyPEM, err := istioCA.GenKeyCert([]string{"istiod.istio-system.svc"}, 24*time.Hour, false)
	if err != nil {
		return nil, err
	}
	serving, err := tls.X509KeyPair(append(certPEM, istioCA.GetCAKeyCertBundle().GetCertChainPem()...), keyPEM)
	if err != nil {
		return nil, err
	}
	if err := os.WriteFile(rootOut, istioCA.GetCAKeyCertBundle().GetRootCertPem(), 0o644); err != nil {
		return nil, err
	}
	l, err := net.Listen("tcp", listen)
	if err != nil {
		return nil, err
	}
	g := grpc.NewServer(grpc.Creds(credentials.NewTLS(&tls.Config{
		Certificates: []tls.Certificate{serving},
		ClientAuth:   tls.VerifyClientCertIfGiven,
		MinVersion:   tls.VersionTLS12,
	})))
	server.Register(g)
	go func() { _ = g.Serve(l) }()
	return l.Addr(), nil
}

// logged writes why an authenticator refused a caller to the log (the CA server answers only
// an opaque "request authenticate failure").
type logged struct{ security.Authenticator }

func (l logged) Authenticate(ctx security.AuthContext) (*security.Caller, error) {
	caller, err := l.Authenticator.Authenticate(ctx)
	if err != nil {
		log.Printf("CA authentication failed: %v", err)
	}
	return caller, err
}
