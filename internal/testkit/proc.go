package testkit

// PID is the node's process id (0 before it started), for reading its /proc entries:
// peak memory, I/O counters.
func (n *Node) PID() int {
	if n.cmd == nil || n.cmd.Process == nil {
		return 0
	}
	return n.cmd.Process.Pid
}
