package agent

import (
	"context"
	"errors"

	"github.com/fireworks-sandbox/fireworks/internal/image"
	"github.com/fireworks-sandbox/fireworks/internal/state"
)

// warmManager owns template snapshots and warm pools (work in progress).
type warmManager struct{}

func (w *warmManager) setPools([]state.Pool)        {}
func (w *warmManager) status() []PoolStatus         { return nil }
func (w *warmManager) templateList() []TemplateInfo { return nil }
func (w *warmManager) warmKeys() []string           { return nil }
func (w *warmManager) warmImage(ctx context.Context, ref string, opts image.PullOptions) (TemplateInfo, error) {
	return TemplateInfo{}, errors.New("not yet")
}
