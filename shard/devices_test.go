package shard_test

import (
	"testing"

	"github.com/strata-llm/strata/shard"
)

func TestPlaceLayers(t *testing.T) {
	const MiB = 1 << 20
	m := &shard.ModelInfo{Layers: 8, KVHeads: 1, HeadDim: 64, LayerBytes: make([]int64, 8), HeadBytes: 300 * MiB, EmbedBytes: 300 * MiB}
	for l := range m.LayerBytes {
		m.LayerBytes[l] = 100 * MiB
	}
	o := shard.PlaceOptions{MaxLayers: -1, Context: 0, Sessions: 1, ElemBytes: 2, Reserve: 50 * MiB}
	gpu := func(name string, free uint64) shard.Device {
		return shard.Device{ID: name, Library: "Vulkan", Name: name, FreeBytes: free}
	}
	for _, tc := range []struct {
		name string
		r    shard.Range
		devs []shard.Device
		max  int
		want string
	}{
		{"no GPU", shard.Range{Start: 0, End: 8}, nil, -1, "CPU [0,8)"},
		{"all fit with the head", shard.Range{Start: 0, End: 8}, []shard.Device{gpu("Vulkan0", 2000*MiB)}, -1, "Vulkan0 [0,8)+head"},
		{"last layers and head first", shard.Range{Start: 0, End: 8}, []shard.Device{gpu("Vulkan0", 650*MiB)}, -1, "CPU [0,5), Vulkan0 [5,8)+head"},
		{"middle stage, no head", shard.Range{Start: 2, End: 6}, []shard.Device{gpu("Vulkan0", 350*MiB)}, -1, "CPU [2,3), Vulkan0 [3,6)"},
		{"two GPUs, contiguous parts", shard.Range{Start: 0, End: 6}, []shard.Device{gpu("CUDA0", 250*MiB), gpu("CUDA1", 250*MiB)}, -1, "CPU [0,2), CUDA0 [4,6), CUDA1 [2,4)"},
		{"--gpu-layers bounds", shard.Range{Start: 0, End: 6}, []shard.Device{gpu("Vulkan0", 2000*MiB)}, 2, "CPU [0,4), Vulkan0 [4,6)"},
		{"too small for a layer", shard.Range{Start: 0, End: 4}, []shard.Device{gpu("Vulkan0", 100*MiB)}, -1, "CPU [0,4)"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			o.MaxLayers = tc.max
			p := shard.PlaceLayers(m, tc.r, tc.devs, o)
			if got := p.String(tc.r); got != tc.want {
				t.Fatalf("placement %q, want %q", got, tc.want)
			}
		})
	}
}

func TestSelectDevices(t *testing.T) {
	devs := []shard.Device{{ID: "0", Library: "CUDA", Name: "CUDA0"}, {ID: "1", Library: "CUDA", Name: "CUDA1"}, {ID: "x", Library: "Vulkan", Name: "Vulkan0"}}
	names := func(ds []shard.Device) (s []string) {
		for _, d := range ds {
			s = append(s, d.Name)
		}
		return s
	}
	for list, want := range map[string]string{"": "[CUDA0 CUDA1 Vulkan0]", "cpu": "[]", "vulkan0": "[Vulkan0]", "CUDA": "[CUDA0 CUDA1]", "1,0": "[CUDA1 CUDA0]"} {
		got, err := shard.SelectDevices(devs, list)
		if err != nil {
			t.Fatalf("%q: %v", list, err)
		}
		if g := names(got); fmtList(g) != want {
			t.Errorf("%q: got %v, want %s", list, g, want)
		}
	}
	for _, bad := range []string{"Metal0", "3", "-1"} {
		if _, err := shard.SelectDevices(devs, bad); err == nil {
			t.Errorf("%q: no error", bad)
		}
	}
}

func fmtList(s []string) string {
	out := "["
	for i, x := range s {
		if i > 0 {
			out += " "
		}
		out += x
	}
	return out + "]"
}
