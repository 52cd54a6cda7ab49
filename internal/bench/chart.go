package bench

import (
	"fmt"
	"image"
	"image/color"
	"image/draw"
	"image/png"
	"math"
	"os"
	"strings"

	"golang.org/x/image/font"
	"golang.org/x/image/font/basicfont"
	"golang.org/x/image/math/fixed"
)

// Chart layout, in pixels: a title and legend on top, one row per series (its name and
// figures on the left, every sample as a dot on a log-scale axis on the right), the axis
// labels at the bottom.
const (
	chartWidth  = 1100
	chartLabelW = 340
	chartRight  = 36
	chartTop    = 60
	chartRowH   = 62
	chartBottom = 48
)

var (
	colBackground = color.NRGBA{0xff, 0xff, 0xff, 0xff}
	colBand       = color.NRGBA{0xf4, 0xf5, 0xf7, 0xff}
	colGrid       = color.NRGBA{0xdc, 0xdf, 0xe4, 0xff}
	colGridMajor  = color.NRGBA{0xa8, 0xae, 0xb8, 0xff}
	colText       = color.NRGBA{0x1f, 0x23, 0x28, 0xff}
	colMuted      = color.NRGBA{0x5f, 0x66, 0x70, 0xff}
	colP50        = color.NRGBA{0x11, 0x11, 0x11, 0xff}
	colP95        = color.NRGBA{0xe0, 0x7b, 0x00, 0xff}
	colP99        = color.NRGBA{0xc6, 0x1f, 0x1f, 0xff}
	colTarget     = color.NRGBA{0x1a, 0x8f, 0x3c, 0xff}
	// One hue per series for its dots (drawn translucent, so dense runs read darker).
	dotPalette = []color.NRGBA{
		{0x2f, 0x6f, 0xd6, 0x80}, {0x8e, 0x44, 0xad, 0x80}, {0x16, 0xa0, 0x85, 0x80},
		{0xd3, 0x54, 0x00, 0x80}, {0x7f, 0x8c, 0x8d, 0x80}, {0xc0, 0x39, 0x2b, 0x80},
	}
)

// chartSize is the image size for n series.
func chartSize(n int) (w, h int) {
	return chartWidth, chartTop + max(n, 1)*chartRowH + chartBottom
}

// WriteChart draws the first-byte distributions of rep's series as a PNG at path.
func WriteChart(path string, rep *Report) error {
	f, err := os.Create(path)
	if err != nil {
		return fmt.Errorf("create chart %s: %w", path, err)
	}
	if err := png.Encode(f, DrawChart(rep)); err != nil {
		f.Close()
		return fmt.Errorf("encode chart %s: %w", path, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("write chart %s: %w", path, err)
	}
	return nil
}

// logAxis maps milliseconds to x on a log scale spanning whole decades.
type logAxis struct {
	lo, hi float64 // ms, powers of ten
	x0, w  int
}

func newLogAxis(values []float64, x0, w int) logAxis {
	lo, hi := math.Inf(1), math.Inf(-1)
	for _, v := range values {
		if v > 0 {
			lo, hi = min(lo, v), max(hi, v)
		}
	}
	if math.IsInf(lo, 1) { // nothing to show: 1 ms to 1 s
		lo, hi = 1, 1000
	}
	a := logAxis{lo: math.Pow(10, math.Floor(math.Log10(lo))), hi: math.Pow(10, math.Ceil(math.Log10(hi))), x0: x0, w: w}
	if a.hi <= a.lo {
		a.hi = a.lo * 10
	}
	return a
}

func (a logAxis) x(v float64) int {
	v = max(a.lo, min(a.hi, v)) // a sample of 0 ms (clock granularity) sits on the left edge
	f := (math.Log10(v) - math.Log10(a.lo)) / (math.Log10(a.hi) - math.Log10(a.lo))
	return a.x0 + int(math.Round(f*float64(a.w)))
}

// DrawChart renders one row per series: every first-byte sample as a dot on a log-scale
// ms axis, with p50/p95/p99 ticks and the target where there is one.
func DrawChart(rep *Report) *image.RGBA {
	var series []Series
	var all []float64
	for _, s := range rep.Series {
		if len(s.FirstBytes) > 0 {
			series = append(series, s)
			all = append(all, s.FirstBytes...)
			if s.TargetP50 > 0 {
				all = append(all, s.TargetP50)
			}
		}
	}
	w, h := chartSize(len(series))
	img := image.NewRGBA(image.Rect(0, 0, w, h))
	draw.Draw(img, img.Bounds(), image.NewUniform(colBackground), image.Point{}, draw.Src)

	plotX0, plotX1 := chartLabelW, w-chartRight
	plotY0, plotY1 := chartTop, chartTop+max(len(series), 1)*chartRowH
	axis := newLogAxis(all, plotX0, plotX1-plotX0)

	title := "Start latency: API call -> first stdout byte, " + strings.Join(rep.Command, " ")
	if rep.Accelerator != "" {
		title += " (" + rep.Accelerator + ")"
	}
	drawText(img, 12, 20, title, colText)
	legendX := 12
	for _, l := range []struct {
		label string
		c     color.NRGBA
	}{{"p50", colP50}, {"p95", colP95}, {"p99", colP99}, {"target p50", colTarget}} {
		fillRect(img, legendX, 34, legendX+3, 48, l.c)
		drawText(img, legendX+7, 46, l.label, colMuted)
		legendX += 14 + textWidth(l.label) + 8
	}
	drawText(img, legendX+12, 46, "dots: every sample (log scale)", colMuted)

	for i := range series {
		if i%2 == 1 {
			fillRect(img, 0, plotY0+i*chartRowH, w, plotY0+(i+1)*chartRowH, colBand)
		}
	}
	// Grid: a line at 1..9 x each decade, labelled at decades (and at 2 and 5 when there
	// are few decades, so the axis is still readable).
	decades := int(math.Round(math.Log10(axis.hi / axis.lo)))
	for d := axis.lo; d < axis.hi*1.0001; d *= 10 {
		for m := 1; m <= 9; m++ {
			v := d * float64(m)
			if v > axis.hi*1.0001 {
				break
			}
			x := axis.x(v)
			c := colGrid
			if m == 1 {
				c = colGridMajor
			}
			fillRect(img, x, plotY0, x+1, plotY1, c)
			if m == 1 || (decades <= 3 && (m == 2 || m == 5)) {
				label := formatMs(v)
				drawText(img, x-textWidth(label)/2, plotY1+16, label, colMuted)
			}
		}
	}
	axisLabel := "milliseconds, log scale"
	drawText(img, plotX0+(plotX1-plotX0-textWidth(axisLabel))/2, plotY1+36, axisLabel, colMuted)
	fillRect(img, plotX0, plotY1, plotX1+1, plotY1+1, colGridMajor)

	maxChars := (chartLabelW - 24) / 7
	for i, s := range series {
		y0 := plotY0 + i*chartRowH
		cy := y0 + chartRowH/2
		drawText(img, 12, y0+22, clip(s.Name, maxChars), colText)
		f := s.FirstByte
		drawText(img, 12, y0+38, clip(fmt.Sprintf("p50 %s  p95 %s  p99 %s", formatMs(f.P50), formatMs(f.P95), formatMs(f.P99)), maxChars), colMuted)
		if s.TargetP50 > 0 {
			met := ""
			if s.TargetMet != nil {
				met = map[bool]string{true: ": met", false: ": missed"}[*s.TargetMet]
			}
			drawText(img, 12, y0+54, clip(fmt.Sprintf("target p50 <= %s%s", formatMs(s.TargetP50), met), maxChars), colTarget)
			tx := axis.x(s.TargetP50)
			for y := y0 + 3; y < y0+chartRowH-3; y += 6 { // dashed
				fillRect(img, tx, y, tx+2, y+3, colTarget)
			}
		}
		dot := dotPalette[i%len(dotPalette)]
		for j, v := range s.FirstBytes {
			// Spread the dots vertically by a low-discrepancy sequence so equal values stay
			// visible as a cloud; deterministic, so the same report draws the same image.
			jitter := math.Mod(float64(j)*0.6180339887, 1)*26 - 13
			fillCircle(img, axis.x(v), cy+int(jitter), 3, dot)
		}
		// p95 is a full tick, p99 caps above and below it (so both show when they fall
		// on the same pixel), p50 a heavier tick over the dots.
		x95, x99, x50 := axis.x(f.P95), axis.x(f.P99), axis.x(f.P50)
		fillRect(img, x95-1, cy-16, x95+1, cy+17, colP95)
		fillRect(img, x99-1, cy-23, x99+1, cy-12, colP99)
		fillRect(img, x99-1, cy+13, x99+1, cy+24, colP99)
		fillRect(img, x50-1, cy-21, x50+2, cy+22, colP50)
	}
	if len(series) == 0 {
		drawText(img, plotX0+12, plotY0+chartRowH/2, "no samples", colMuted)
	}
	return img
}

// formatMs writes a duration in ms compactly: 0.4 ms, 12 ms, 250 ms, 3.2 s.
func formatMs(v float64) string {
	switch {
	case v >= 1000:
		return trimZero(fmt.Sprintf("%.1f", v/1000)) + " s"
	case v >= 10:
		return fmt.Sprintf("%.0f ms", v)
	default:
		return trimZero(fmt.Sprintf("%.2f", v)) + " ms"
	}
}

func trimZero(s string) string {
	if strings.Contains(s, ".") {
		s = strings.TrimRight(strings.TrimRight(s, "0"), ".")
	}
	return s
}

func clip(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:max(0, n-3)] + "..."
}

func drawText(img draw.Image, x, baseline int, s string, c color.Color) {
	d := font.Drawer{Dst: img, Src: image.NewUniform(c), Face: basicfont.Face7x13, Dot: fixed.P(x, baseline)}
	d.DrawString(s)
}

func textWidth(s string) int { return font.MeasureString(basicfont.Face7x13, s).Ceil() }

func fillRect(img *image.RGBA, x0, y0, x1, y1 int, c color.NRGBA) {
	for y := y0; y < y1; y++ {
		for x := x0; x < x1; x++ {
			blend(img, x, y, c)
		}
	}
}

func fillCircle(img *image.RGBA, cx, cy, r int, c color.NRGBA) {
	for y := -r; y <= r; y++ {
		for x := -r; x <= r; x++ {
			if x*x+y*y <= r*r+r/2 {
				blend(img, cx+x, cy+y, c)
			}
		}
	}
}

// blend paints c over the pixel at x, y by c's alpha (the image stays opaque).
func blend(img *image.RGBA, x, y int, c color.NRGBA) {
	if !(image.Point{X: x, Y: y}).In(img.Rect) {
		return
	}
	i := img.PixOffset(x, y)
	a := uint32(c.A)
	for k, v := range [3]uint8{c.R, c.G, c.B} {
		img.Pix[i+k] = uint8((uint32(v)*a + uint32(img.Pix[i+k])*(255-a)) / 255)
	}
	img.Pix[i+3] = 0xff
}
