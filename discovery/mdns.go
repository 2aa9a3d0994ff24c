package discovery

import (
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/p2p/discovery/mdns"
)

// startMDNS announces this node on the local network and joins the nodes it hears of.
// mDNS is a convenience: multicast is often blocked in clouds and containers, and a
// loopback-only namespace has no interface for it ("no supported interface"), so a failure
// is logged and the node carries on with --join.
func (m *Membership) startMDNS(service string) {
	svc := mdns.NewMdnsService(m.host, service, (*mdnsNotifee)(m))
	if err := svc.Start(); err != nil {
		_ = svc.Close()
		m.mdnsErr = err
		m.log.Info("mDNS discovery unavailable; use --join", "err", err)
		return
	}
	m.mdns = svc
}

type mdnsNotifee Membership

// HandlePeerFound runs on its own goroutine per find (go-libp2p starts one), possibly
// after Shutdown began, and again each time the peer is announced.
func (n *mdnsNotifee) HandlePeerFound(ai peer.AddrInfo) {
	m := (*Membership)(n)
	key := ai.ID.String()
	m.mu.Lock()
	if m.closed || m.joining[key] {
		m.mu.Unlock()
		return
	}
	m.joining[key] = true
	m.wg.Add(1)
	m.mu.Unlock()
	defer func() {
		m.mu.Lock()
		delete(m.joining, key)
		m.mu.Unlock()
		m.wg.Done()
	}()

	for _, mem := range m.Members() {
		if mem.PeerID == ai.ID || mem.Name == key {
			return // already a member
		}
	}
	addrs, err := m.resolvePeer(m.ctx, ai)
	if err != nil {
		m.log.Debug("mDNS peer did not answer the members protocol", "peer", ai.ID, "err", err)
		return
	}
	for _, a := range addrs {
		if _, err := m.ml.Join([]string{a}); err == nil {
			m.log.Info("joined a peer found by mDNS", "peer", ai.ID, "addr", a)
			return
		} else if m.ctx.Err() != nil {
			return
		}
	}
	m.log.Debug("could not join mDNS peer", "peer", ai.ID, "addrs", addrs)
}
