// The few OS calls that differ between Linux, macOS and other POSIX systems, in one place.
//
// Everything else in cpp/ uses plain POSIX; a name that exists on Linux only (accept4,
// SOCK_CLOEXEC, MSG_NOSIGNAL, /proc readers, _SC_AVPHYS_PAGES, ...) belongs behind these helpers.
// cpp/check_portable.py (run by tests/test_portable.py) flags such names anywhere in cpp/ outside
// cpp/platform/. Each helper sets errno like the call it wraps, so callers report failures with
// strerror(errno) as before.
#pragma once

#include <cstddef>
#include <cstdint>
#include <sys/types.h>

// socket(2) whose fd is close-on-exec (a stage's sockets must not leak into processes it starts),
// and on macOS has SO_NOSIGPIPE set (macOS has no per-call MSG_NOSIGNAL; see nak_send_nosignal).
// Returns the fd, or -1 with errno set.
int nak_socket(int family, int type, int protocol);

// Accept one pending connection on listen_fd as a non-blocking, close-on-exec fd (SO_NOSIGPIPE on
// macOS). Returns the fd, or -1 with errno set: EAGAIN / EWOULDBLOCK when nothing is pending on a
// non-blocking listening socket.
int nak_accept(int listen_fd);

// send(2) of n bytes that never raises SIGPIPE when the peer has gone (EPIPE instead), and does
// not block when dontwait (MSG_DONTWAIT). Returns the bytes sent (possibly fewer than n), or -1
// with errno set. On macOS the socket must come from nak_socket / nak_accept (SO_NOSIGPIPE).
ssize_t nak_send_nosignal(int fd, const void * data, size_t n, bool dontwait);

// Resident set size of this process, bytes (the memory it occupies in RAM now, not its peak);
// 0 when the OS does not tell.
uint64_t nak_rss_bytes();

// The resident set split, bytes: `anon` is memory only this process holds (weights copied out of
// the file, e.g. by CPU repacking; the KV cache; compute buffers; the heap): what it really costs
// the host. `file` is file-backed pages, chiefly the mmap'd GGUF: the kernel can drop these under
// pressure and read them again, so they count in RSS but not in what the process needs.
// Linux: /proc/self/statm (resident - shared, shared); macOS: the task's physical footprint as
// anon, the rest of its resident size as file. false (both 0) when the OS does not tell.
bool nak_rss_split(uint64_t & anon, uint64_t & file);

// Memory the host could still give a process without swapping, bytes: Linux MemAvailable (free
// plus reclaimable page cache), macOS free + inactive pages; 0 when the OS does not tell.
uint64_t nak_mem_available_bytes();

// Private memory this process holds in RAM now (anonymous pages: heap, buffers it wrote), bytes,
// after returning the allocator's free pages to the OS first, so that a before/after difference
// counts what a piece of code keeps and has touched (cpp/stage/memory_estimate.cpp: llama.cpp's
// vocabulary and graph structures), not memory freed earlier or allocated and never written.
// Linux: malloc_trim (glibc), then /proc/self/statm resident - shared; macOS: the task's
// physical footprint. false (0) where the OS does not tell.
bool nak_private_resident_bytes(uint64_t & bytes);
