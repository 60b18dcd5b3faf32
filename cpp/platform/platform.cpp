#include "platform.h"

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <fcntl.h>
#include <sys/socket.h>
#include <unistd.h>

#if defined(__APPLE__)
#include <mach/mach.h>
#include <mach/mach_host.h>
#include <malloc/malloc.h>
#endif
#if defined(__linux__)
#include <malloc.h>
#endif

// Every Linux- or Apple-specific name in cpp/ lives below, behind #if defined(__linux__) /
// #elif defined(__APPLE__), with a generic POSIX branch last (the BSDs, and anything else that
// builds us). cpp/check_portable.py flags such names everywhere else.

// ---- helpers for the non-Linux branches ---------------------------------------------------------

#if !defined(__linux__)
// Set FD_CLOEXEC (and O_NONBLOCK when nonblock) on fd; false with errno set on failure. Not
// atomic with the socket()/accept() that made fd (only Linux has the flags for that): a fork+exec
// on another thread in between could inherit the fd. Stages start no processes while serving, so
// the window does not matter here.
static bool set_fd_flags(int fd, bool nonblock) {
    const int fd_fl = fcntl(fd, F_GETFD);
    if (fd_fl < 0 || fcntl(fd, F_SETFD, fd_fl | FD_CLOEXEC) != 0) {
        return false;
    }
    if (nonblock) {
        const int fl = fcntl(fd, F_GETFL);
        if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) != 0) {
            return false;
        }
    }
    return true;
}

// Ask the socket itself not to raise SIGPIPE (macOS, the BSDs: SO_NOSIGPIPE), where send() has no
// MSG_NOSIGNAL flag. Best effort: a socket type without the option keeps the default.
static void set_nosigpipe(int fd) {
#if defined(SO_NOSIGPIPE)
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_NOSIGPIPE, &one, sizeof(one));
#else
    (void) fd;
#endif
}

// close fd without letting close() overwrite the errno of the failure being reported
static void close_keep_errno(int fd) {
    const int saved = errno;
    close(fd);
    errno = saved;
}
#endif

// ---- sockets ------------------------------------------------------------------------------------

int nak_socket(int family, int type, int protocol) {
#if defined(__linux__)
    // atomic: no window in which a forked child could inherit the fd
    return socket(family, type | SOCK_CLOEXEC, protocol);
#else
    const int fd = socket(family, type, protocol);
    if (fd < 0) {
        return -1;
    }
    if (!set_fd_flags(fd, false)) {
        close_keep_errno(fd);
        return -1;
    }
    set_nosigpipe(fd);
    return fd;
#endif
}

int nak_accept(int listen_fd) {
#if defined(__linux__)
    // accepted sockets do not inherit O_NONBLOCK on Linux: ask for it (and close-on-exec) atomically
    return accept4(listen_fd, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
#else
    const int fd = accept(listen_fd, nullptr, nullptr);
    if (fd < 0) {
        return -1;
    }
    if (!set_fd_flags(fd, true)) {
        close_keep_errno(fd);
        return -1;
    }
    // set on the accepted socket too: whether it inherits the listening socket's option is not
    // documented
    set_nosigpipe(fd);
    return fd;
#endif
}

ssize_t nak_send_nosignal(int fd, const void * data, size_t n, bool dontwait) {
    int flags = dontwait ? MSG_DONTWAIT : 0;
#if defined(__linux__)
    flags |= MSG_NOSIGNAL;
#elif defined(__APPLE__)
    // SIGPIPE is off per socket (SO_NOSIGPIPE, set by nak_socket / nak_accept)
#elif defined(MSG_NOSIGNAL)
    flags |= MSG_NOSIGNAL; // FreeBSD, NetBSD, OpenBSD have the Linux flag
#endif
    return send(fd, data, n, flags);
}

// ---- memory -------------------------------------------------------------------------------------

bool nak_rss_split(uint64_t & anon, uint64_t & file) {
    anon = file = 0;
#if defined(__linux__)
    FILE * f = fopen("/proc/self/statm", "r");
    if (!f) {
        return false;
    }
    unsigned long size = 0, resident = 0, shared = 0;
    const int n = fscanf(f, "%lu %lu %lu", &size, &resident, &shared);
    fclose(f);
    const long page = sysconf(_SC_PAGESIZE);
    if (n != 3 || page <= 0) {
        return false;
    }
    // statm's "shared" is RssFile + RssShmem: the file-backed resident pages
    anon = (uint64_t) (resident > shared ? resident - shared : 0) * (uint64_t) page;
    file = (uint64_t) shared * (uint64_t) page;
    return true;
#elif defined(__APPLE__)
    task_vm_info_data_t vm = {};
    mach_msg_type_number_t count = TASK_VM_INFO_COUNT;
    if (task_info(mach_task_self(), TASK_VM_INFO, (task_info_t) &vm, &count) != KERN_SUCCESS) {
        return false;
    }
    anon = (uint64_t) vm.phys_footprint;
    file = vm.resident_size > vm.phys_footprint ? (uint64_t) (vm.resident_size - vm.phys_footprint) : 0;
    return true;
#else
    return false;
#endif
}

uint64_t nak_rss_bytes() {
#if defined(__linux__)
    // statm counts pages; the page size is not always 4096 (arm64 kernels with 16 or 64 KiB pages)
    FILE * f = fopen("/proc/self/statm", "r");
    if (!f) {
        return 0;
    }
    unsigned long size = 0, resident = 0;
    const int n = fscanf(f, "%lu %lu", &size, &resident);
    fclose(f);
    const long page = sysconf(_SC_PAGESIZE);
    return n == 2 && page > 0 ? (uint64_t) resident * (uint64_t) page : 0;
#elif defined(__APPLE__)
    // no /proc on macOS: the Mach task's basic info has the resident size in bytes
    mach_task_basic_info_data_t info = {};
    mach_msg_type_number_t count = MACH_TASK_BASIC_INFO_COUNT;
    if (task_info(mach_task_self(), MACH_TASK_BASIC_INFO, (task_info_t) &info, &count) != KERN_SUCCESS) {
        return 0;
    }
    return (uint64_t) info.resident_size;
#else
    // POSIX has no call for the current RSS (getrusage's ru_maxrss is the peak, in units that
    // differ between systems)
    return 0;
#endif
}

uint64_t nak_mem_available_bytes() {
#if defined(__linux__)
    // MemAvailable: what the kernel could give without swapping (free + reclaimable cache), the
    // number `nak plan` wants; free pages alone undercount a host whose page cache is full
    FILE * f = fopen("/proc/meminfo", "r");
    if (f) {
        char line[256];
        unsigned long long kb = 0;
        while (fgets(line, sizeof(line), f)) {
            if (sscanf(line, "MemAvailable: %llu kB", &kb) == 1) {
                break;
            }
        }
        fclose(f);
        if (kb > 0) {
            return (uint64_t) kb * 1024;
        }
    }
    // no /proc (a container without it) or a kernel before 3.14: free physical pages
    const long pages = sysconf(_SC_AVPHYS_PAGES);
    const long page  = sysconf(_SC_PAGESIZE);
    return pages > 0 && page > 0 ? (uint64_t) pages * (uint64_t) page : 0;
#elif defined(__APPLE__)
    // free + inactive pages, as `vm_stat` and psutil count available memory on macOS: inactive
    // pages are reclaimable without swapping. free_count already includes the speculative
    // (read-ahead) pages; purgeable pages are not added because they are also counted as active
    // or inactive.
    mach_port_t host = mach_host_self();
    vm_statistics64_data_t vm = {};
    mach_msg_type_number_t count = HOST_VM_INFO64_COUNT;
    const kern_return_t kr = host_statistics64(host, HOST_VM_INFO64, (host_info64_t) &vm, &count);
    mach_port_deallocate(mach_task_self(), host); // mach_host_self() hands out a new port right each call
    if (kr != KERN_SUCCESS) {
        return 0;
    }
    // the counts are in kernel pages (as in llama.cpp's tests/test-rset-release.cpp)
    return ((uint64_t) vm.free_count + (uint64_t) vm.inactive_count) * (uint64_t) vm_kernel_page_size;
#elif defined(_SC_AVPHYS_PAGES)
    // not POSIX, but Solaris and some BSDs have it: free physical pages
    const long pages = sysconf(_SC_AVPHYS_PAGES);
    const long page  = sysconf(_SC_PAGESIZE);
    return pages > 0 && page > 0 ? (uint64_t) pages * (uint64_t) page : 0;
#else
    return 0;
#endif
}

bool nak_private_resident_bytes(uint64_t & bytes) {
    bytes = 0;
#if defined(__linux__)
#if defined(__GLIBC__)
    malloc_trim(0); // free chunks back to the OS, in every arena
#endif
    FILE * f = fopen("/proc/self/statm", "r");
    if (!f) {
        return false;
    }
    unsigned long long size = 0, resident = 0, shared = 0;
    const int n = fscanf(f, "%llu %llu %llu", &size, &resident, &shared);
    fclose(f);
    if (n != 3) {
        return false;
    }
    bytes = (uint64_t) (resident - std::min(resident, shared)) * (uint64_t) sysconf(_SC_PAGESIZE);
    return true;
#elif defined(__APPLE__)
    malloc_zone_pressure_relief(nullptr, 0); // as malloc_trim: free pages back to the OS
    task_vm_info_data_t info = {};
    mach_msg_type_number_t count = TASK_VM_INFO_COUNT;
    if (task_info(mach_task_self(), TASK_VM_INFO, (task_info_t) &info, &count) != KERN_SUCCESS) {
        return false;
    }
    bytes = (uint64_t) info.phys_footprint;
    return true;
#else
    return false;
#endif
}
