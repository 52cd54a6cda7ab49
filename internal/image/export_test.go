package image

// BuildCount reports how many root disk builds s started.
func BuildCount(s *Store) int64 { return s.builds.Load() }
