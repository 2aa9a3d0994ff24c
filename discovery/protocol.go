package discovery

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"slices"
	"strconv"
	"time"

	"github.com/libp2p/go-libp2p/core/network"
	"github.com/libp2p/go-libp2p/core/peer"
	"github.com/libp2p/go-libp2p/core/protocol"
	ma "github.com/multiformats/go-multiaddr"
	manet "github.com/multiformats/go-multiaddr/net"
	"github.com/vmihailenco/msgpack/v5"
)

// MembersProtocol answers, over libp2p, where a node's memberlist listens, so a node that
// knows only a peer's libp2p multiaddr can join its memberlist.
const MembersProtocol = protocol.ID("/strata/members/1.0.0")

const (
	membersTimeout   = 5 * time.Second
	membersMaxAnswer = 1024
)

// membersAnswer is the protocol's only message, sent by the answering side.
type membersAnswer struct {
	Name string `msgpack:"n"`
	Addr string `msgpack:"a"` // advertised memberlist host:port
	Port int    `msgpack:"p"` // memberlist port, to pair with the IP the asker reached us at
}

func (m *Membership) serveMembers(s network.Stream) {
	defer s.Close()
	_ = s.SetDeadline(time.Now().Add(membersTimeout))
	n := m.ml.LocalNode()
	b, err := msgpack.Marshal(&membersAnswer{Name: n.Name, Addr: m.LocalAddr(), Port: int(n.Port)})
	if err != nil {
		m.log.Warn("members protocol: encode answer", "err", err)
		_ = s.Reset()
		return
	}
	if _, err := s.Write(b); err != nil {
		m.log.Debug("members protocol: write answer", "peer", s.Conn().RemotePeer(), "err", err)
		_ = s.Reset()
	}
}

// resolveMultiaddr dials a /p2p/ multiaddr and returns the memberlist addresses to try for
// that node: first its memberlist port at the IP we reached it at (what it advertises may be
// an address only it can see), then what it advertises.
func (m *Membership) resolveMultiaddr(ctx context.Context, s string) ([]string, error) {
	if m.host == nil {
		return nil, errors.New("joining through a libp2p address needs a libp2p host (WithHost)")
	}
	addr, err := ma.NewMultiaddr(s)
	if err != nil {
		return nil, fmt.Errorf("parse multiaddr: %w", err)
	}
	ai, err := peer.AddrInfoFromP2pAddr(addr)
	if err != nil {
		return nil, fmt.Errorf("multiaddr has no /p2p/ peer ID: %w", err)
	}
	return m.resolvePeer(ctx, *ai)
}

func (m *Membership) resolvePeer(ctx context.Context, ai peer.AddrInfo) ([]string, error) {
	if ai.ID == m.host.ID() {
		return nil, errors.New("that is this node's own peer ID")
	}
	ctx, cancel := context.WithTimeout(ctx, membersTimeout)
	defer cancel()
	if err := m.host.Connect(ctx, ai); err != nil {
		return nil, fmt.Errorf("connect to %s: %w", ai.ID, err)
	}
	s, err := m.host.NewStream(ctx, ai.ID, MembersProtocol)
	if err != nil {
		return nil, fmt.Errorf("open %s stream to %s: %w", MembersProtocol, ai.ID, err)
	}
	defer s.Close()
	if dl, ok := ctx.Deadline(); ok {
		_ = s.SetDeadline(dl)
	}
	b, err := io.ReadAll(io.LimitReader(s, membersMaxAnswer+1))
	if err != nil {
		return nil, fmt.Errorf("read members answer from %s: %w", ai.ID, err)
	}
	if len(b) > membersMaxAnswer {
		return nil, fmt.Errorf("members answer from %s longer than %d bytes", ai.ID, membersMaxAnswer)
	}
	var ans membersAnswer
	if err := msgpack.Unmarshal(b, &ans); err != nil {
		return nil, fmt.Errorf("decode members answer from %s: %w", ai.ID, err)
	}
	var out []string
	if ans.Port > 0 && ans.Port <= 65535 {
		if ip, err := manet.ToIP(s.Conn().RemoteMultiaddr()); err == nil {
			out = append(out, net.JoinHostPort(ip.String(), strconv.Itoa(ans.Port)))
		}
	}
	if _, _, err := net.SplitHostPort(ans.Addr); err == nil && !slices.Contains(out, ans.Addr) {
		out = append(out, ans.Addr)
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("members answer from %s has no usable address (%+v)", ai.ID, ans)
	}
	return out, nil
}
