package p2p

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/libp2p/go-libp2p/core/crypto"
	"github.com/libp2p/go-libp2p/core/pnet"
)

// LoadOrCreateIdentity reads the node's Ed25519 key from path, or creates it (mode 0600) if
// the file does not exist, so the peer ID survives restarts. An unreadable or corrupt file is
// an error, never silently replaced: peers and plans refer to the old ID.
func LoadOrCreateIdentity(path string) (crypto.PrivKey, error) {
	b, err := os.ReadFile(path)
	if err == nil {
		k, err := crypto.UnmarshalPrivateKey(b)
		if err != nil {
			return nil, fmt.Errorf("read identity %s: %w (delete it to make a new peer ID)", path, err)
		}
		return k, nil
	}
	if !errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("read identity: %w", err)
	}
	k, _, err := crypto.GenerateEd25519Key(rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("generate identity: %w", err)
	}
	b, err = crypto.MarshalPrivateKey(k)
	if err != nil {
		return nil, fmt.Errorf("marshal identity: %w", err)
	}
	if err := writeNew(path, b); err != nil {
		if errors.Is(err, fs.ErrExist) {
			// Another process created it between our read and write: use theirs.
			return LoadOrCreateIdentity(path)
		}
		return nil, fmt.Errorf("write identity: %w", err)
	}
	return k, nil
}

// writeNew writes a 0600 file that must not exist yet, completely or not at all.
func writeNew(path string, b []byte) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return err
	}
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	if err := tmp.Chmod(0o600); err != nil {
		tmp.Close()
		return err
	}
	if _, err := tmp.Write(b); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	// A hard link fails if path exists, where a rename would replace it.
	return os.Link(tmp.Name(), path)
}

// swarmKeyHeader is the IPFS/libp2p private network key file format, v1, hex encoded.
const swarmKeyHeader = "/key/swarm/psk/1.0.0/\n/base16/\n"

// GenerateSwarmKey writes a new random 32-byte pre-shared key to path (mode 0600) in the
// IPFS swarm.key format. Nodes started with the same file form a private swarm: they only
// talk to each other. It refuses to overwrite an existing file.
func GenerateSwarmKey(path string) error {
	key := make([]byte, 32)
	if _, err := rand.Read(key); err != nil {
		return fmt.Errorf("generate swarm key: %w", err)
	}
	b := []byte(swarmKeyHeader + hex.EncodeToString(key) + "\n")
	if err := writeNew(path, b); err != nil {
		return fmt.Errorf("write swarm key: %w", err)
	}
	return nil
}

// LoadSwarmKey reads a swarm.key file (IPFS format: base16, base64 or bin encodings).
func LoadSwarmKey(path string) (pnet.PSK, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read swarm key: %w", err)
	}
	psk, err := pnet.DecodeV1PSK(bytes.NewReader(b))
	if err != nil {
		return nil, fmt.Errorf("parse swarm key %s: %w", path, err)
	}
	return psk, nil
}
