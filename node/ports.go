package node

import (
	"errors"
	"fmt"
	"net"
	"strconv"
	"syscall"

	ma "github.com/multiformats/go-multiaddr"
)

// checkPorts binds, briefly, every fixed port the node will serve on, before the minutes of
// hashing, benchmarking and joining that come first. libp2p sets SO_REUSEPORT, so a second
// node on a port another one holds would start and then fail joins half the time ("peer id
// mismatch"); a plain bind, without SO_REUSEPORT, fails while any process holds the port.
func (n *Node) checkPorts() error {
	inUse := func(what, addr string, err error) error {
		if errors.Is(err, syscall.EADDRINUSE) {
			return fmt.Errorf("%s: %s is in use by another process (another strata node? nodes on one machine need their own --listen, --api and --gossip ports): %w", what, addr, err)
		}
		return fmt.Errorf("%s: cannot bind %s: %w", what, addr, err)
	}
	if err := bindOnce("tcp", n.cfg.API); err != nil {
		return inUse("--api", n.cfg.API, err)
	}
	for _, s := range n.cfg.Listen {
		network, addr, ok := fixedPort(s)
		if !ok {
			continue
		}
		if err := bindOnce(network, addr); err != nil {
			return inUse("--listen "+s, addr, err)
		}
	}
	host, port, err := n.gossipAddr()
	if err != nil {
		return err
	}
	if port > 0 {
		addr := net.JoinHostPort(host, strconv.Itoa(port))
		for _, network := range []string{"tcp", "udp"} { // memberlist binds both
			if err := bindOnce(network, addr); err != nil {
				return inUse("gossip (--gossip, default the libp2p port + 1)", addr, err)
			}
		}
	}
	return nil
}

// fixedPort returns the network and host:port of an IP multiaddr with a port other than 0.
func fixedPort(s string) (network, addr string, ok bool) {
	m, err := ma.NewMultiaddr(s)
	if err != nil {
		return "", "", false
	}
	ip, err := m.ValueForProtocol(ma.P_IP4)
	if err != nil {
		if ip, err = m.ValueForProtocol(ma.P_IP6); err != nil {
			return "", "", false
		}
	}
	network = "tcp"
	port, err := m.ValueForProtocol(ma.P_TCP)
	if err != nil {
		network = "udp"
		if port, err = m.ValueForProtocol(ma.P_UDP); err != nil {
			return "", "", false
		}
	}
	if port == "0" {
		return "", "", false
	}
	return network, net.JoinHostPort(ip, port), true
}

func bindOnce(network, addr string) error {
	if network == "udp" {
		c, err := net.ListenPacket("udp", addr)
		if err != nil {
			return err
		}
		return c.Close()
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	return ln.Close()
}
