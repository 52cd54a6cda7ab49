package image

// BuildCount reports how many root disk builds s started.
func BuildCount(s *Store) int64 { return s.builds.Load() }

// OwnerUsage is the bytes of the images owner holds, for tests.
func (s *Store) OwnerUsage(owner string) (int64, error) {
	imgs, err := s.OwnerImages(owner)
	var n int64
	for _, b := range imgs {
		n += b
	}
	return n, err
}
