pluginManagement {
    repositories {
        google()
        mavenCentral()
        gradlePluginPortal()
    }
}
dependencyResolutionManagement {
    repositoriesMode.set(RepositoriesMode.FAIL_ON_PROJECT_REPOS)
    repositories {
        google()
        mavenCentral()
        // org.rustls:rustls-platform-verifier (the Kotlin part of the SDK's TLS
        // verifier, see herald/build.gradle.kts) is published only here.
        maven {
            url = uri("https://github.com/rustls/rustls-platform-verifier/raw/maven-archive/android-release-support/maven/")
            content { includeGroup("org.rustls") }
        }
    }
}
rootProject.name = "herald-android-sample"
// :herald wraps the generated Kotlin binding and the cargo-ndk libraries of this
// repository (bindings/build-android.sh); :app is the sample.
include(":herald", ":app")
