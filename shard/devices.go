package shard

import (
	"fmt"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"github.com/ollama/ollama/ml"
)

// Device is a GPU ggml sees: one of its GPU backends (Vulkan, CUDA, ROCm, Metal) is loaded
// (make vulkan, make cuda) and found a device. The CPU is not a Device: it takes whatever no
// device holds.
type Device struct {
	ID          string `json:"id"`      // the engine's id, unique within Library
	Library     string `json:"library"` // "Vulkan", "CUDA", ...
	Name        string `json:"name"`    // ggml's name, e.g. "Vulkan0", "CUDA0"
	Description string `json:"description,omitempty"`
	TotalBytes  uint64 `json:"total_bytes"`
	FreeBytes   uint64 `json:"free_bytes"`
}

// GPUDevices lists the GPUs ggml sees, through a backend on the GGUF at path that allocates
// nothing (ggml enumerates devices only for a model file). A CPU-only build or machine has
// none. The Vulkan backend skips CPU Vulkan devices (lavapipe) unless GGML_VK_VISIBLE_DEVICES
// names them.
//
// It must run while no stage exists in the process: ggml's scheduler marks the buffer types
// it is given, which are process-wide singletons, as not allocating when the backend
// allocates nothing, so a live stage's next compute buffer would be a null one (a SIGSEGV,
// seen). The next backend that allocates clears the mark.
func GPUDevices(path string) (devs []Device, err error) {
	defer func() {
		if p := recover(); p != nil {
			err = fmt.Errorf("ggml device query on %s: %v", filepath.Base(path), p)
		}
	}()
	b, err := ml.NewBackend(path, ml.BackendParams{AllocMemory: false, NumThreads: 1})
	if err != nil {
		return nil, fmt.Errorf("ggml device query: %w", err)
	}
	defer b.Close()
	for _, d := range b.BackendDevices() {
		devs = append(devs, Device{ID: d.ID, Library: d.Library, Name: d.Name, Description: d.Description,
			TotalBytes: d.TotalMemory, FreeBytes: d.FreeMemory})
	}
	return devs, nil
}

// SelectDevices keeps the devices a --devices list names, in the list's order: each entry a
// ggml name ("Vulkan0"), a library ("CUDA": all its devices) or an index into devs. "cpu" or
// "none" alone keeps none; an empty list keeps all.
func SelectDevices(devs []Device, list string) ([]Device, error) {
	list = strings.TrimSpace(list)
	if list == "" {
		return devs, nil
	}
	if l := strings.ToLower(list); l == "cpu" || l == "none" {
		return nil, nil
	}
	var out []Device
	for _, e := range strings.Split(list, ",") {
		e = strings.TrimSpace(e)
		var hit []Device
		if i, err := strconv.Atoi(e); err == nil {
			if i < 0 || i >= len(devs) {
				return nil, fmt.Errorf("devices: index %d, but ggml sees %d GPU(s)%s", i, len(devs), listNames(devs))
			}
			hit = devs[i : i+1]
		} else {
			for _, d := range devs {
				if strings.EqualFold(d.Name, e) || strings.EqualFold(d.Library, e) {
					hit = append(hit, d)
				}
			}
		}
		if len(hit) == 0 {
			return nil, fmt.Errorf("devices: no GPU %q among the ones ggml sees%s", e, listNames(devs))
		}
		for _, d := range hit {
			if !slices.Contains(out, d) {
				out = append(out, d)
			}
		}
	}
	return out, nil
}

func listNames(devs []Device) string {
	if len(devs) == 0 {
		return " (none: is a GPU backend built? make vulkan or make cuda)"
	}
	names := make([]string, len(devs))
	for i, d := range devs {
		names[i] = d.Name
	}
	return " (" + strings.Join(names, ", ") + ")"
}

// GPULayers is the part of a stage one device computes: its layers, and the LM head when
// Output is set (the stage is the model's last). Their KV cache sits beside them.
type GPULayers struct {
	Device Device `json:"device"`
	Layers Range  `json:"layers"`
	Output bool   `json:"output,omitempty"`
}

// Placement is where a stage's layers compute.
type Placement []GPULayers

// GPULayerCount is how many of the stage's layers the devices hold.
func (p Placement) GPULayerCount() int {
	n := 0
	for _, g := range p {
		n += g.Layers.Len()
	}
	return n
}

// String writes p for a stage of layers r as "CPU [0,6), Vulkan0 [6,12)+head".
func (p Placement) String(r Range) string {
	var parts []string
	cpu := r
	for _, g := range p {
		if !g.Layers.Empty() && g.Layers.Start < cpu.End {
			cpu.End = g.Layers.Start
		}
	}
	if !cpu.Empty() {
		parts = append(parts, "CPU "+cpu.String())
	}
	for _, g := range p {
		s := g.Device.Name + " " + g.Layers.String()
		if g.Output {
			s += "+head"
		}
		parts = append(parts, s)
	}
	if len(parts) == 0 {
		return "CPU"
	}
	return strings.Join(parts, ", ")
}

// PlaceOptions bounds PlaceLayers.
type PlaceOptions struct {
	MaxLayers int // at most this many layers on GPUs; negative: as many as fit
	Context   int // tokens per session of the stage's KV cache
	Sessions  int
	ElemBytes int // KV cache element bytes (2 for F16)
	// Reserve is left free on each device for ggml's compute buffers and the driver
	// (default: 10% of the device's free memory plus 256 MiB).
	Reserve uint64
}

// PlaceLayers puts the last layers of r (and the LM head when r ends the model) on the
// devices, each taking what its free memory holds of weights and KV cache, the first device
// the last layers; the layers before them stay on the CPU. The last layers go first, as in
// ollama, so the head (the largest matmul) is on a GPU whenever any layer is. Each device's
// layers are contiguous, so activations cross between devices only at a few boundaries.
func PlaceLayers(m *ModelInfo, r Range, devs []Device, o PlaceOptions) Placement {
	budget := o.MaxLayers
	if budget < 0 || budget > r.Len() {
		budget = r.Len()
	}
	var p Placement
	end := r.End
	for _, d := range devs {
		if budget == 0 || end <= r.Start {
			break
		}
		reserve := o.Reserve
		if reserve == 0 {
			reserve = d.FreeBytes/10 + 256<<20
		}
		if d.FreeBytes <= reserve {
			continue
		}
		room := int64(d.FreeBytes - reserve)
		g := GPULayers{Device: d, Layers: Range{Start: end, End: end}}
		if end == m.Layers && m.HeadBytes <= room {
			g.Output = true
			room -= m.HeadBytes
		}
		for budget > 0 && g.Layers.Start > r.Start {
			l := g.Layers.Start - 1
			cost := m.LayerBytes[l] + m.RangeKVBytes(Range{Start: l, End: l + 1}, o.Context, o.Sessions, o.ElemBytes)
			if cost > room {
				break
			}
			room -= cost
			g.Layers.Start = l
			budget--
		}
		if g.Layers.Empty() {
			// The head alone on a device would split the last layer from its output
			// for no gain; leave the device out.
			continue
		}
		p = append(p, g)
		end = g.Layers.Start
	}
	return p
}

// gpuLayersList is p in the engine's terms: layer indices per device; the LM head is the
// engine's layer index Layers.
func (p Placement) gpuLayersList(layers int) ml.GPULayersList {
	var out ml.GPULayersList
	for _, g := range p {
		gl := ml.GPULayers{DeviceID: ml.DeviceID{ID: g.Device.ID, Library: g.Device.Library}}
		for l := g.Layers.Start; l < g.Layers.End; l++ {
			gl.Layers = append(gl.Layers, l)
		}
		if g.Output {
			gl.Layers = append(gl.Layers, layers)
		}
		out = append(out, gl)
	}
	return out
}
