package bench

import (
	"image/color"
	"image/png"
	"math"
	"os"
	"path/filepath"
	"testing"
)

func syntheticReport() *Report {
	met, missed := true, false
	spread := func(center float64, n int) []float64 {
		var xs []float64
		for i := range n {
			xs = append(xs, center*(1+0.3*math.Sin(float64(i))))
		}
		return xs
	}
	mk := func(key, name string, center float64, target float64, m *bool) Series {
		s := Series{Key: key, Name: name, Runs: 50, FirstBytes: spread(center, 50), TargetP50: target, TargetMet: m}
		s.FirstByte = summarize(s.FirstBytes)
		return s
	}
	return &Report{Accelerator: "tcg", Command: []string{"echo", "ready"}, Series: []Series{
		mk(KeyCold, "fireworks cold boot (tcg)", 3000, 0, nil),
		mk(KeyRestore, "fireworks snapshot restore (tcg)", 320, 400, &met),
		mk(KeyPool, "fireworks warm-pool claim (tcg)", 120, 100, &missed),
		mk(KeyExec, "fireworks exec in a running sandbox (tcg)", 12, 0, nil),
		mk(KeyCrun, "crun (no VM, via unshare -m)", 25, 0, nil),
		{Key: "empty", Name: "no samples: left out"},
	}}
}

func TestWriteChart(t *testing.T) {
	path := filepath.Join(t.TempDir(), "bench-results.png")
	if err := WriteChart(path, syntheticReport()); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	img, err := png.Decode(f)
	if err != nil {
		t.Fatalf("%s is not a PNG: %v", path, err)
	}
	w, h := chartSize(5) // the series without samples gets no row
	if b := img.Bounds(); b.Dx() != w || b.Dy() != h {
		t.Fatalf("chart is %dx%d, want %dx%d", b.Dx(), b.Dy(), w, h)
	}
	// Every row has marks in its plot area (dots and ticks), and the image has more than
	// background, bands and grid in it.
	white := color.RGBAModel.Convert(colBackground)
	colors := map[color.Color]bool{}
	for i := range 5 {
		marks := 0
		for y := chartTop + i*chartRowH; y < chartTop+(i+1)*chartRowH; y++ {
			for x := chartLabelW; x < w-chartRight; x++ {
				c := color.RGBAModel.Convert(img.At(x, y))
				colors[c] = true
				if r, g, b, _ := c.RGBA(); r < 0xc000 || g < 0xc000 || b < 0xc000 {
					marks++
				}
			}
		}
		if marks < 50 {
			t.Errorf("row %d has %d dark pixels in its plot area: looks blank", i, marks)
		}
	}
	if len(colors) < 10 {
		t.Errorf("only %d colours in the plot: looks blank", len(colors))
	}
	// The label column has text.
	text := 0
	for y := chartTop; y < chartTop+chartRowH; y++ {
		for x := 0; x < chartLabelW; x++ {
			if color.RGBAModel.Convert(img.At(x, y)) != white {
				text++
			}
		}
	}
	if text == 0 {
		t.Error("no series label drawn")
	}
}

func TestDrawChartEdgeCases(t *testing.T) {
	// No series, and samples at 0 ms (below the clock's resolution): still an image.
	for _, rep := range []*Report{
		{},
		{Series: []Series{{Name: "zero", FirstBytes: []float64{0, 0, 0.001}}}},
		{Series: []Series{{Name: "one", FirstBytes: []float64{5}}}},
	} {
		img := DrawChart(rep)
		w, h := chartSize(len(rep.Series))
		if img.Bounds().Dx() != w || img.Bounds().Dy() != h {
			t.Errorf("%+v: chart is %v", rep.Series, img.Bounds())
		}
	}
}

func TestFormatMs(t *testing.T) {
	for v, want := range map[float64]string{0.5: "0.5 ms", 1: "1 ms", 12.4: "12 ms", 250: "250 ms", 1000: "1 s", 3250: "3.2 s", 0.01: "0.01 ms"} {
		if got := formatMs(v); got != want {
			t.Errorf("formatMs(%v) = %q, want %q", v, got, want)
		}
	}
}
