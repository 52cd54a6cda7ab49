// Package rootfs makes root filesystem trees and their layer tars: a Debian minbase
// root by debootstrap, and the tar of a tree as `docker import` takes it. The node image
// build (internal/release/nodeimage) and the tests' distribution images share it.
package rootfs
