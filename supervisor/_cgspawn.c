/* Start a program straight into a cgroup, as a child of our own parent.
 *
 *   _cgspawn CGROUP_DIR_FD PID_FD [RESOURCE SOFT HARD]... -- PROGRAM [ARG...]
 *
 * clone3(CLONE_INTO_CGROUP): the new process is born in the cgroup whose
 * directory is open on CGROUP_DIR_FD, so it never runs outside it, and no
 * migration is needed (writing a pid to cgroup.procs waits for an RCU grace
 * period in the writer: 1 to 15 ms).  CLONE_PARENT makes it the child of
 * our parent (the supervisor, which waits on it).  The child sets each
 * resource limit (RESOURCE as in <sys/resource.h>; -1 is unlimited), starts
 * a new session and executes PROGRAM (looked up on PATH when it has no
 * slash), without CGROUP_DIR_FD and PID_FD.  CLONE_VFORK returns once it has
 * done so or failed.  Written to PID_FD: its pid in decimal, or "!STEP
 * ERRNO PID" (STEP: limit, exec) when it failed and exited 127 (the caller
 * reaps it).  The supervisor
 * builds the command line (supervisor/_held.py), never a user.
 *
 * Exit: 0 (the pid or the failure written); 100 usage; 111 clone3 failed
 * (ENOSYS before Linux 5.7: the supervisor then moves processes instead).
 * Compiled at install (setup.py; contrib/dev for the source tree).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#ifndef CLONE_INTO_CGROUP
#define CLONE_INTO_CGROUP 0x200000000ULL
#endif

#define MAX_LIMITS 32

static int parse(const char *s, long long *v) {
    char *end;
    errno = 0;
    *v = strtoll(s, &end, 10);
    return *s && !*end && !errno;
}

int main(int argc, char **argv) {
    long long cg, out, v[3];
    int resources[MAX_LIMITS], n = 0, i = 3;
    struct rlimit limits[MAX_LIMITS];
    if (argc < 5 || !parse(argv[1], &cg) || !parse(argv[2], &out) || cg < 0 || out < 0) return 100;
    for (; i < argc && strcmp(argv[i], "--") != 0; i += 3) {
        if (i + 2 >= argc || n == MAX_LIMITS || !parse(argv[i], &v[0]) || !parse(argv[i + 1], &v[1]) ||
            !parse(argv[i + 2], &v[2]))
            return 100;
        resources[n] = (int)v[0];
        limits[n].rlim_cur = v[1] < 0 ? RLIM_INFINITY : (rlim_t)v[1];
        limits[n].rlim_max = v[2] < 0 ? RLIM_INFINITY : (rlim_t)v[2];
        n++;
    }
    if (i + 1 >= argc) return 100;
    char **program = argv + i + 1;
    int err[2]; /* the child's failure: step and errno; a successful exec closes it */
    if (pipe2(err, O_CLOEXEC) < 0) return 111;
    struct clone_args args;
    memset(&args, 0, sizeof args);
    /* No CLONE_VM: the child is a copy of this small process, on its own stack. */
    args.flags = CLONE_INTO_CGROUP | CLONE_PARENT | CLONE_VFORK;
    args.exit_signal = 0; /* with CLONE_PARENT the kernel gives it ours (SIGCHLD) */
    args.cgroup = (uint64_t)cg;
    long pid = syscall(SYS_clone3, &args, sizeof args);
    if (pid < 0) {
        dprintf(2, "_cgspawn: clone3: %s\n", strerror(errno));
        return 111;
    }
    if (pid == 0) {
        int failure[2] = {0, 0};
        close((int)cg);
        close((int)out);
        close(err[0]);
        for (int k = 0; k < n; k++) {
            if (setrlimit(resources[k], &limits[k]) != 0) {
                failure[0] = 1;
                failure[1] = errno;
                (void)!write(err[1], failure, sizeof failure);
                _exit(127);
            }
        }
        setsid();
        execvp(program[0], program);
        failure[0] = 2;
        failure[1] = errno;
        (void)!write(err[1], failure, sizeof failure);
        _exit(127);
    }
    close(err[1]);
    int failure[2];
    if (read(err[0], failure, sizeof failure) == (ssize_t)sizeof failure)
        dprintf((int)out, "!%s %d %ld", failure[0] == 1 ? "limit" : "exec", failure[1], pid);
    else
        dprintf((int)out, "%ld", pid);
    return 0;
}
