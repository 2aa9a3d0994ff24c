package node

import (
	"net"
	"strconv"
	"strings"
	"testing"
)

// A port another process holds is refused up front, with an error that says so, for the API
// and for libp2p (whose own bind would succeed beside another libp2p host: SO_REUSEPORT).
func TestCheckPortsRefusesHeldPorts(t *testing.T) {
	held, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer held.Close()
	port := held.Addr().(*net.TCPAddr).Port
	free := func() string {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		return ln.Addr().String()
	}
	for name, cfg := range map[string]Config{
		"api":    {API: held.Addr().String(), Listen: []string{"/ip4/127.0.0.1/tcp/0"}},
		"listen": {API: free(), Listen: []string{"/ip4/127.0.0.1/tcp/" + strconv.Itoa(port)}},
	} {
		n := &Node{cfg: cfg}
		err := n.checkPorts()
		if err == nil || !strings.Contains(err.Error(), "in use by another process") {
			t.Errorf("%s: %v, want a port in use", name, err)
		}
	}
	n := &Node{cfg: Config{API: free(), Listen: []string{"/ip4/127.0.0.1/tcp/0", "/ip4/127.0.0.1/udp/0/quic-v1"}}}
	if err := n.checkPorts(); err != nil {
		t.Fatalf("free ports: %v", err)
	}
}
