package bench

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"math"
	"net/http"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Machine describes where a benchmark ran.
type Machine struct {
	CPUs       int     `json:"cpus"`
	CPUModel   string  `json:"cpu_model"`
	Flags      string  `json:"cpu_simd"` // the SIMD extensions ggml can use
	RAMBytes   int64   `json:"ram_bytes"`
	Kernel     string  `json:"kernel"`
	GoVer      string  `json:"go"`
	LoadAvg    float64 `json:"load_avg_1m_at_start"` // other work on the machine skews every number
	LoadAvgEnd float64 `json:"load_avg_1m_at_end"`
	// CopyBandwidth is memory copy speed over all cores, bytes read plus written per second.
	CopyBandwidth float64 `json:"copy_bandwidth_bytes_per_s"`
}

// ReadMachine describes this machine (without measuring bandwidth).
func ReadMachine() Machine {
	m := Machine{CPUs: runtime.NumCPU(), GoVer: runtime.Version()}
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			k, v, ok := strings.Cut(line, ":")
			if !ok {
				continue
			}
			switch strings.TrimSpace(k) {
			case "model name":
				if m.CPUModel == "" {
					m.CPUModel = strings.TrimSpace(v)
				}
			case "flags":
				if m.Flags == "" {
					var simd []string
					for _, f := range strings.Fields(v) {
						switch f {
						case "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_tile":
							simd = append(simd, f)
						}
					}
					m.Flags = strings.Join(simd, " ")
				}
			}
		}
	}
	m.RAMBytes = meminfo("MemTotal")
	if b, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		m.Kernel = strings.TrimSpace(string(b))
	}
	if b, err := os.ReadFile("/proc/loadavg"); err == nil {
		if f := strings.Fields(string(b)); len(f) > 0 {
			m.LoadAvg, _ = strconv.ParseFloat(f[0], 64)
		}
	}
	return m
}

func meminfo(key string) int64 {
	b, err := os.ReadFile("/proc/meminfo")
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, key+":"); ok {
			if f := strings.Fields(rest); len(f) > 0 {
				kb, _ := strconv.ParseInt(f[0], 10, 64)
				return kb << 10
			}
		}
	}
	return 0
}

// CopyBandwidth measures memory copy speed with one goroutine per core, in bytes read plus
// written per second: the best of a few passes over buffers far larger than the caches.
// Decoding a token reads every weight once, so weight bytes / this bandwidth (x2, a copy
// also writes) bounds decode speed from below.
func CopyBandwidth(size int, passes int) float64 {
	n := runtime.NumCPU()
	per := size / n
	src := make([][]byte, n)
	dst := make([][]byte, n)
	for i := range n {
		src[i] = make([]byte, per)
		dst[i] = make([]byte, per)
		for j := range src[i] {
			src[i][j] = byte(j)
		}
		copy(dst[i], src[i]) // fault the pages in
	}
	best := math.Inf(1)
	for range passes {
		var wg sync.WaitGroup
		start := time.Now()
		for i := range n {
			wg.Add(1)
			go func() {
				defer wg.Done()
				copy(dst[i], src[i])
			}()
		}
		wg.Wait()
		best = min(best, time.Since(start).Seconds())
	}
	return 2 * float64(per*n) / best
}

// ProcMemory is a process's resident memory: now and its peak (VmHWM).
type ProcMemory struct {
	RSS  int64 `json:"rss_bytes"`
	Peak int64 `json:"peak_rss_bytes"`
}

// ReadProcMemory reads /proc/PID/status ("self" for this process).
func ReadProcMemory(pid string) (ProcMemory, error) {
	f, err := os.Open("/proc/" + pid + "/status")
	if err != nil {
		return ProcMemory{}, fmt.Errorf("read memory of process %s: %w", pid, err)
	}
	defer f.Close()
	var m ProcMemory
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), ":")
		if !ok {
			continue
		}
		var dst *int64
		switch k {
		case "VmRSS":
			dst = &m.RSS
		case "VmHWM":
			dst = &m.Peak
		default:
			continue
		}
		if fs := strings.Fields(v); len(fs) > 0 {
			kb, _ := strconv.ParseInt(fs[0], 10, 64)
			*dst = kb << 10
		}
	}
	if err := sc.Err(); err != nil {
		return m, fmt.Errorf("read memory of process %s: %w", pid, err)
	}
	if m.Peak == 0 {
		return m, fmt.Errorf("read memory of process %s: no VmHWM in its status", pid)
	}
	return m, nil
}

// WrittenBytes is what a process has written through system calls so far (/proc/PID/io
// wchar): sockets, files and pipes. For a node during a benchmark that is almost all
// libp2p traffic, Noise and yamux included.
func WrittenBytes(pid string) (int64, error) {
	b, err := os.ReadFile("/proc/" + pid + "/io")
	if err != nil {
		return 0, fmt.Errorf("read I/O counters of process %s: %w", pid, err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, "wchar:"); ok {
			return strconv.ParseInt(strings.TrimSpace(rest), 10, 64)
		}
	}
	return 0, fmt.Errorf("read I/O counters of process %s: no wchar", pid)
}

// errNoMetric means a node's /metrics does not have the series (an older node).
var errNoMetric = errors.New("metric not exported")

// ScrapeCounter reads one series of a Prometheus text exposition from http://addr/metrics,
// e.g. name `strata_wire_bytes_total` with labels `direction="out"`.
func ScrapeCounter(ctx context.Context, client *http.Client, addr, name, labels string) (float64, error) {
	if labels != "" {
		name += "{" + labels + "}"
	}
	v, err := ScrapeCounters(ctx, client, addr, name)
	if err != nil {
		return 0, err
	}
	return v[0], nil
}

// ResetPeak resets a process's VmHWM to its current RSS ("self" for this process), so a
// later peak belongs to what ran in between. Linux only.
func ResetPeak(pid string) error {
	if err := os.WriteFile("/proc/"+pid+"/clear_refs", []byte("5"), 0); err != nil {
		return fmt.Errorf("reset peak RSS of process %s: %w", pid, err)
	}
	return nil
}

// userHZ is the unit of /proc's CPU times (USER_HZ, 100 on every Linux architecture Go runs on).
const userHZ = 100

// cpuSample is the machine's busy CPU time and the part of it our own processes used, in
// USER_HZ ticks: the difference between two samples tells how much other work competed.
type cpuSample struct {
	busy, ours int64
	at         time.Time
}

func sampleCPU(pids []string) cpuSample {
	s := cpuSample{at: time.Now()}
	if b, err := os.ReadFile("/proc/stat"); err == nil {
		line, _, _ := strings.Cut(string(b), "\n")
		if f := strings.Fields(line); len(f) > 8 && f[0] == "cpu" {
			for i, v := range f[1:] {
				n, _ := strconv.ParseInt(v, 10, 64)
				if i != 3 && i != 4 { // idle and iowait are not busy
					s.busy += n
				}
			}
		}
	}
	for _, pid := range pids {
		b, err := os.ReadFile("/proc/" + pid + "/stat")
		if err != nil {
			continue
		}
		// The command name may hold spaces: fields count from the closing parenthesis.
		_, rest, ok := strings.Cut(string(b), ") ")
		if f := strings.Fields(rest); ok && len(f) > 12 {
			u, _ := strconv.ParseInt(f[11], 10, 64)
			st, _ := strconv.ParseInt(f[12], 10, 64)
			s.ours += u + st
		}
	}
	return s
}

// otherCores is how many cores other processes kept busy on average between a and b.
func otherCores(a, b cpuSample) float64 {
	d := b.at.Sub(a.at).Seconds()
	if d <= 0 {
		return 0
	}
	return max(0, float64((b.busy-a.busy)-(b.ours-a.ours))/userHZ/d)
}
