/* A dynamically linked musl program for the musl-based image in
 * tests/testhost/oci-images.sh: it reads the image's /etc/passwd through
 * musl's getpwuid, its cwd and env, and exits with its first argument
 * ("wait": waits for a signal instead, as a VM's long-running main process). */
#include <pwd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int main(int argc, char **argv) {
    char cwd[256];
    struct passwd *pw = getpwuid(getuid());
    const char *greeting = getenv("GREETING");
    printf("hello from musl: user=%s cwd=%s greeting=%s\n", pw ? pw->pw_name : "?",
           getcwd(cwd, sizeof cwd) ? cwd : "?", greeting ? greeting : "");
    fflush(stdout);
    if (argc > 1 && strcmp(argv[1], "wait") == 0)
        pause();
    return argc > 1 ? atoi(argv[1]) : 0;
}
