package agent

// SetSavedDiskMiB changes the node's budget for saved states (Config.SavedDiskMiB) for a
// test. Call it only while no pause or snapshot runs.
func (a *Agent) SetSavedDiskMiB(mib int) { a.cfg.SavedDiskMiB = mib }
