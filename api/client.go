package api

import (
	"crypto/sha256"
	"encoding/hex"
	"net"
	"net/http"
)

// clientKey tells clients apart for the admission queue's fairness: by the credentials the
// request carries (hashed, so the queue never holds a secret), else by the remote host.
func clientKey(r *http.Request) string {
	for _, h := range []string{"Authorization", "X-Api-Key"} {
		if v := r.Header.Get(h); v != "" {
			sum := sha256.Sum256([]byte(v))
			return "key:" + hex.EncodeToString(sum[:8])
		}
	}
	host, _, err := net.SplitHostPort(r.RemoteAddr)
	if err != nil {
		host = r.RemoteAddr
	}
	return "addr:" + host
}
